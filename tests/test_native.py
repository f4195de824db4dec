"""The native window-attention kernel (``esc_runtime.native``): built on first use, equal to the reference attention,
used by CPU inference exactly where it applies, and out of the way (with the reason stated) everywhere else."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import esc_arch
from esc_runtime import native
from esc_arch.attention import WindowAttention, relative_position_index
from esc_arch.layers import ConvFFN, LayerNorm2d, geometric_ensemble
from golden import checkpoint_path, golden_cases, tensors

REPO = Path(__file__).resolve().parent.parent
# The kernel is built where it was measured: x86-64 Linux with a C++ compiler and AVX-512. This development machine
# and CI are such machines; elsewhere the tests that need the kernel say why they cannot run.
NEEDS_KERNEL = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.status()}")
BUILT_HERE = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def _has_avx512() -> bool:
    try:
        return re.search(r"\bavx512f\b", Path("/proc/cpuinfo").read_text()) is not None
    except OSError:
        return False


def test_the_kernels_are_built_wherever_they_apply() -> None:
    """On x86-64 Linux with a compiler and AVX-512 (this project's machines and CI) the kernels must be there, so the
    tests marked NEEDS_KERNEL can only be skipped where the kernels do not apply, never because a build broke."""
    if BUILT_HERE and native._compiler() is not None and _has_avx512():
        assert native.available(), native.status()
    else:
        assert not native.available() and native.status()


def reference(qkv: torch.Tensor, table: torch.Tensor, batch: int, height: int, width: int, heads: int, window: int):
    """softmax(q k^T / 4 + bias) v per window and head in float64, from the kernel's raster-order layout."""
    nh, nw, t, c = height // window, width // window, window * window, native.HEAD_DIM
    x = qkv.double().view(batch, nh, window, nw, window, 3, heads, c).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, batch, nh, nw, heads, t, c).unbind(0)
    bias = table.double().index_select(1, relative_position_index(window).reshape(-1)).view(heads, t, t)
    out = ((q @ k.transpose(-1, -2)) / math.sqrt(c) + bias).softmax(-1) @ v  # (b, nh, nw, heads, t, c)
    out = out.view(batch, nh, nw, heads, window, window, c).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch * height * width, heads * c)


GEOMETRIES = [(1, 64, 64, 4, 32), (2, 32, 48, 2, 16), (1, 48, 96, 3, 48), (3, 16, 16, 1, 16)]


@NEEDS_KERNEL
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"b{g[0]}-{g[1]}x{g[2]}-h{g[3]}-ws{g[4]}" for g in GEOMETRIES])
def test_kernel_equals_float64_attention(geometry) -> None:
    batch, height, width, heads, window = geometry
    generator = torch.Generator().manual_seed(0)
    # scores spread over tens of units: the softmax is far from uniform, as in trained models
    qkv = torch.randn(batch * height * width, 3 * heads * 16, generator=generator) * 2.0
    table = torch.randn(heads, (2 * window - 1) ** 2, generator=generator) * 3.0
    out = native.window_attention(qkv, table, batch=batch, height=height, width=width, heads=heads, window=window)
    expected = reference(qkv, table, batch, height, width, heads, window)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


@NEEDS_KERNEL
def test_kernel_refuses_what_it_does_not_take() -> None:
    qkv, table = torch.zeros(40 * 64, 3 * 64), torch.zeros(4, 63 * 63)
    with pytest.raises(ValueError, match="does not take a 40x64 map"):
        native.window_attention(qkv, table, batch=1, height=40, width=64, heads=4, window=32)
    with pytest.raises(ValueError, match="contiguous float32 rows"):
        native.window_attention(qkv.t(), table, batch=1, height=40, width=64, heads=4, window=32)


def test_portable_build_without_avx512_computes_the_same(tmp_path) -> None:
    """The source also builds for CPUs without AVX-512 (GCC vector extensions, the exponent by integer arithmetic);
    the loader does not use that build, but it must compute the same thing."""
    compiler = native._compiler()
    if compiler is None:  # nothing to build with: the loader says so, and torch's operators run
        assert not native.available() and "no C++ compiler" in native.status()
        return
    library = tmp_path / "portable.so"
    flags = [f for f in native.FLAGS if f != "-march=native"] + (["-march=x86-64-v3"] if BUILT_HERE else [])
    subprocess.run([compiler, *flags, *map(str, native.SOURCES), "-o", str(library)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(library))
    lib.esc_window_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    assert lib.esc_window_attention_vector_bits() == 0
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(32 * 32, 3 * 32, generator=generator) * 2.0
    table = torch.randn(2, 31 * 31, generator=generator) * 3.0
    out = torch.empty(32 * 32, 32)
    scaled = (table * native.LOG2_E).contiguous()
    assert lib.esc_window_attention(qkv.data_ptr(), scaled.data_ptr(), out.data_ptr(), 1, 32, 32, 2, 16, 2) == 0
    expected = reference(qkv, table, 1, 32, 32, 2, 16)
    assert (out.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


def _layer(dim: int, window: int, heads: int) -> WindowAttention:
    layer = WindowAttention(dim, window, heads, "sdpa").eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return layer


@NEEDS_KERNEL
@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 40, 70), (1, 5, 3)], ids=["aligned", "padded-batch", "tiny"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_on_the_kernel_equals_torch_flash_path(shape, channels_last) -> None:
    batch, height, width = shape
    layer = _layer(64, 32, 4)
    x = torch.randn(batch, 64, height, width, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert native.applies(x, head_dim=16, window=32)
        kernel = layer(x, add=residual)
        flash = layer._forward_sdpa_cpu(x, add=residual)
    assert kernel.shape == flash.shape == x.shape
    assert (kernel - flash).abs().max().item() <= 2e-6 * flash.abs().max().item()


@NEEDS_KERNEL
def test_only_float32_inference_outside_tracing_takes_the_kernel() -> None:
    x = torch.randn(1, 64, 32, 32)
    with torch.inference_mode():
        assert native.applies(x, head_dim=16, window=32)
        assert not native.applies(x, head_dim=8, window=32)    # another head dimension
        assert not native.applies(x, head_dim=16, window=8)     # a window that is not a multiple of 16
        assert not native.applies(x.double(), head_dim=16, window=32)
        assert not native.applies(x.to(torch.bfloat16), head_dim=16, window=32)
    assert not native.applies(x, head_dim=16, window=32)        # autograd on: training runs torch's sdpa
    # a trained layer: gradients flow (through torch's sdpa), and equal the naive reference's
    layer = _layer(64, 32, 4).train()
    naive = WindowAttention(64, 32, 4, "naive")
    naive.load_state_dict(layer.state_dict())
    grads = []
    for module in (layer, naive):
        xi = x.clone().requires_grad_()
        module(xi).square().sum().backward()
        grads.append(xi.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-4 * grads[1].abs().max().item()


@NEEDS_KERNEL
def test_attention_kernel_reports_the_native_kernel_for_cpu_inference() -> None:
    model = esc_arch.esc_tiny(scale=4)  # window 16, heads of 16 channels
    assert esc_arch.attention_kernel(model, "cpu").startswith("native (CPU)")
    assert "math" in esc_arch.attention_kernel(model, "cpu", training=True)
    assert "native" not in esc_arch.attention_kernel(model, "cpu", torch.bfloat16)


def _fresh_load(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the kernel is built or refused once per process)."""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


_PROBE = """
import warnings, torch, esc_arch
from esc_runtime import native
warnings.simplefilter("always")
model = esc_arch.esc_tiny(scale=2).eval()
with torch.inference_mode():
    out = model(torch.rand(1, 3, 20, 24))
print("status:", native.status())
print("shape:", tuple(out.shape))
"""


def test_switched_off_or_without_a_compiler_inference_runs_on_torch_and_says_why(tmp_path) -> None:
    off = _fresh_load(_PROBE, {"ESC_SR_NATIVE": "0", "ESC_SR_CACHE": str(tmp_path)})
    assert off.returncode == 0, off.stderr
    assert "status: switched off (ESC_SR_NATIVE=0)" in off.stdout and "shape: (1, 3, 40, 48)" in off.stdout
    no_compiler = _fresh_load(_PROBE, {"CXX": "no-such-compiler", "PATH": str(tmp_path), "ESC_SR_CACHE": str(tmp_path)})
    assert no_compiler.returncode == 0, no_compiler.stderr
    assert "status: no C++ compiler" in no_compiler.stdout and "shape: (1, 3, 40, 48)" in no_compiler.stdout
    assert "RuntimeWarning" not in no_compiler.stderr  # an expected situation, not a fault
    assert not any(tmp_path.rglob("*.so"))


def test_a_failed_build_warns_once_and_inference_still_runs(tmp_path) -> None:
    failed = _fresh_load(_PROBE + "model(torch.rand(1, 3, 20, 24))\n", {"CXX": "false", "ESC_SR_CACHE": str(tmp_path)})
    assert failed.returncode == 0, failed.stderr
    assert "shape: (1, 3, 40, 48)" in failed.stdout
    if BUILT_HERE:
        assert "status: build failed" in failed.stdout
        assert failed.stderr.count("native CPU kernels were not built") == 1
    else:  # no build is tried where the kernels were never measured: nothing to warn about
        assert "status: not built on" in failed.stdout and "not built" not in failed.stderr


def test_the_build_is_cached_per_machine_and_concurrent_builds_agree(tmp_path) -> None:
    code = "from esc_arch import native; print(native.status())"
    env = {"ESC_SR_CACHE": str(tmp_path), "ESC_SR_NATIVE": "1"}
    builders = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [b.communicate(timeout=300) for b in builders]
    assert all(b.returncode == 0 for b in builders), outputs
    libraries = list((tmp_path / "kernels").glob("esc_kernels-*.so"))
    if not (BUILT_HERE and native._compiler() is not None):  # nothing is built, and nothing is left in the cache
        assert not libraries and all(out.strip() for out, _ in outputs)
        return
    assert len(libraries) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p not in libraries]
    built = libraries[0].stat().st_mtime_ns
    again = _fresh_load(code, env)  # a later process loads the cached build
    assert again.returncode == 0 and libraries[0].name in again.stdout
    assert libraries[0].stat().st_mtime_ns == built


@pytest.mark.parametrize("case", golden_cases(), ids=[c["id"] for c in golden_cases()])
def test_golden_cases_on_the_default_cpu_path(case) -> None:
    """Every golden case (the official code's outputs) is reproduced by the default CPU inference path, which is
    the native kernel wherever the model's heads and window fit it."""
    overrides = {"esc_x2_into_x4": {"upscaling_factor": 4}}.get(case["id"], {})
    model = esc_arch.load_model(checkpoint_path(case), **overrides).eval()
    attention = next((m for m in model.modules() if isinstance(m, WindowAttention)), None)
    on_kernel = attention is not None and native.takes("cpu", torch.float32, head_dim=attention.dim // attention.num_heads,
                                                        window=attention.window_size)
    assert esc_arch.attention_kernel(model, "cpu").startswith("native") == on_kernel
    data = tensors(case)
    for run in case["runs"]:
        with torch.inference_mode():
            out = model(*[data[name] for name in run["inputs"].values()])
        assert (out - data[run["output"]]).abs().max().item() <= 1e-4, run["output"]


def _ffn(dim: int, ratio: float, seed: int = 5) -> ConvFFN:
    ffn = ConvFFN(dim, 3, ratio).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return ffn


def _plain_ffn(ffn: ConvFFN, x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """The FFN in float64 with torch's exact GELU: the reference."""
    f = {name: p.double() for name, p in ffn.named_parameters()}
    h = F.gelu(F.conv2d(x.double(), f["proj.weight"], f["proj.bias"]))
    h = F.gelu(F.conv2d(h, f["dwc.weight"], f["dwc.bias"], padding=1, groups=h.shape[1])) + h
    out = F.conv2d(h, f["aggr.weight"], f["aggr.bias"])
    return out if add is None else out + add.double()


# (channels, expansion, batch, height, width): ESC's conv-stage FFN (80 hidden), its first FFN (128), the default
# model's (40 hidden: padded to 48), ESC-XL's (240), ESC-FP's (48 channels, 60 hidden), one-row and one-pixel maps
FFNS = [(64, 1.25, 1, 37, 45), (64, 2.0, 1, 16, 20), (32, 1.25, 2, 9, 70), (192, 1.25, 1, 6, 7), (48, 1.25, 1, 5, 9),
        (16, 2.0, 1, 1, 5), (32, 1.25, 3, 1, 1)]


@NEEDS_KERNEL
@pytest.mark.parametrize("case", FFNS, ids=[f"c{c[0]}-x{c[1]}-b{c[2]}-{c[3]}x{c[4]}" for c in FFNS])
@pytest.mark.parametrize("with_add", [False, True])
def test_fused_ffn_equals_the_float64_ffn(case, with_add) -> None:
    channels, ratio, batch, height, width = case
    ffn = _ffn(channels, ratio)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(batch, channels, height, width, generator=generator)
    add = torch.randn(x.shape, generator=generator) if with_add else None
    with torch.inference_mode():
        assert native.takes_ffn(x, channels=channels, hidden=ffn.proj.out_channels, kernel_size=3)
        out = ffn(x, add=add)
    expected = _plain_ffn(ffn, x, add)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


@NEEDS_KERNEL
def test_fused_ffn_is_for_inference_only_and_whole_vectors_of_channels() -> None:
    x = torch.randn(1, 40, 8, 8)
    with torch.inference_mode():
        assert not native.takes_ffn(x, channels=40, hidden=50, kernel_size=3)  # not whole vectors: oneDNN
        assert not native.takes_ffn(x[:, :32], channels=32, hidden=40, kernel_size=5)
        assert not native.takes_ffn(x[:, :32].double(), channels=32, hidden=40, kernel_size=3)
    assert not native.takes_ffn(x[:, :32], channels=32, hidden=40, kernel_size=3)  # autograd on
    ffn = _ffn(32, 1.25).train()
    xi = x[:, :32].clone().requires_grad_()
    ffn(xi).square().sum().backward()  # training runs torch's operators, with gradients
    assert xi.grad is not None and ffn.proj.weight.grad is not None


def _direct_correlation(x, kernel, dynamic):
    """The large-kernel correlation plus each sample's depthwise 3x3, in float64: the reference."""
    k = kernel.shape[-1]
    x, kernel, dynamic = x.double(), kernel.double(), dynamic.double()
    b, c = x.shape[:2]
    depthwise = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), dynamic.reshape(b * c, 1, 3, 3), padding=1, groups=b * c)
    return F.conv2d(x, kernel, padding=k // 2) + depthwise.view(x.shape)


# (batch, channels, height, width, kernel): ESC's 16 channels, the default model's 8 (padded to 16), ESC-XL's 48, a
# batch with a dynamic kernel per sample, maps smaller than the kernel, another kernel size
CORRELATIONS = [(1, 16, 37, 45, 13), (1, 8, 20, 33, 13), (1, 48, 9, 14, 13), (2, 16, 15, 17, 13), (1, 16, 3, 5, 13),
                (1, 4, 12, 11, 7)]


@NEEDS_KERNEL
@pytest.mark.parametrize("case", CORRELATIONS, ids=[f"b{c[0]}-c{c[1]}-{c[2]}x{c[3]}-k{c[4]}" for c in CORRELATIONS])
def test_symmetric_correlation_equals_the_direct_one(case) -> None:
    batch, channels, height, width, k = case
    generator = torch.Generator().manual_seed(7)
    kernel = geometric_ensemble(torch.randn(channels, channels, k, k, generator=generator) * 0.1)
    dynamic = torch.randn(batch, channels, 3, 3, generator=generator)
    # the first channels of a wider channels-last map, written into the first channels of another: as ESC runs it
    wide = torch.randn(batch, channels + 8, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    out = torch.zeros_like(wide)
    with torch.inference_mode():
        prepared = native.prepare_symmetric(kernel, wide)
        assert isinstance(prepared, native.SymmetricKernel)
        prepared.correlate(wide[:, :channels], dynamic, out=out[:, :channels])
    expected = _direct_correlation(wide[:, :channels], kernel, dynamic)
    assert (out[:, :channels].double() - expected).abs().max().item() <= 4e-6 * expected.abs().max().item()
    assert not out[:, channels:].any()  # nothing written beyond its channels


@NEEDS_KERNEL
def test_symmetric_correlation_reads_tiles_cut_from_a_map() -> None:
    generator = torch.Generator().manual_seed(8)
    kernel = geometric_ensemble(torch.randn(16, 16, 13, 13, generator=generator) * 0.1)
    dynamic = torch.randn(1, 16, 3, 3, generator=generator)
    whole = torch.randn(1, 64, 40, 50, generator=generator).contiguous(memory_format=torch.channels_last)
    tile = whole[:, :16, 5:30, 7:41]  # row stride of the whole map's width
    out = torch.empty(1, 16, 25, 34).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        native.SymmetricKernel(kernel).correlate(tile, dynamic, out=out)
    expected = _direct_correlation(tile, kernel, dynamic)
    assert (out.double() - expected).abs().max().item() <= 4e-6 * expected.abs().max().item()


@NEEDS_KERNEL
def test_only_square_symmetric_float32_inference_kernels_are_prepared() -> None:
    kernel, x = geometric_ensemble(torch.randn(16, 16, 13, 13)), torch.randn(1, 64, 8, 8)
    with torch.inference_mode():
        assert native.prepare_symmetric(kernel, x) is not None
        assert native.prepare_symmetric(kernel[:8], x) is None  # not square in channels
        assert native.prepare_symmetric(kernel.double(), x.double()) is None
        assert native.prepare_symmetric(kernel, x.to(torch.bfloat16)) is None
    assert native.prepare_symmetric(kernel, x) is None  # autograd on: training convolves directly


# (batch, channels of the kernel, channels of the map, height, width): ESC, the default model, ESC-XL; widths that are
# not multiples of the kernel's pixel blocks
PARTIAL = [(1, 16, 64, 37, 53), (2, 8, 32, 11, 19), (1, 48, 192, 5, 9)]


@NEEDS_KERNEL
@pytest.mark.parametrize("case", PARTIAL, ids=[f"b{c[0]}-pdim{c[1]}-dim{c[2]}-{c[3]}x{c[4]}" for c in PARTIAL])
@pytest.mark.parametrize("with_add", [False, True])
def test_fused_partial_convolution_equals_its_layers(case, with_add) -> None:
    """ESC's partial convolution and its 1x1 projection in one native pass, against the layers run one by one."""
    batch, pdim, dim, height, width = case
    generator = torch.Generator().manual_seed(9)
    kernel = geometric_ensemble(torch.randn(pdim, pdim, 13, 13, generator=generator) * 0.1)
    project = torch.nn.Conv2d(dim, dim, 1)
    dynamic = torch.randn(batch, pdim, 3, 3, generator=generator)
    x = torch.randn(batch, dim, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    add = torch.randn(x.shape, generator=generator) if with_add else None
    with torch.inference_mode():
        out = native.SymmetricKernel(kernel).partial_conv_attention(x, dynamic, project, add)
    mixed = torch.cat([_direct_correlation(x[:, :pdim], kernel, dynamic), x[:, pdim:].double()], 1)
    expected = F.conv2d(mixed, project.weight.double(), project.bias.double())
    expected = expected if add is None else expected + add.double()
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max().item() <= 4e-6 * expected.abs().max().item()


@NEEDS_KERNEL
def test_models_on_the_native_kernels_match_torch_operators_and_stream_exactly() -> None:
    """Whole models: the native kernels against torch's operators (native switched off), and layer-streamed tiles
    (tiles cut from the maps, the partial convolution reading them in place) against the whole map."""
    from esc_runtime.streaming import TiledMaps  # noqa: PLC0415

    # the default model; ESC-light; ESC-FP, whose blocks have LayerNorms in front of every FFN (fused into the kernel)
    for preset, x in (("esc_tiny", torch.rand(2, 3, 45, 61)), ("esc_light", torch.rand(1, 3, 70, 38)),
                      ("esc_fp", torch.rand(1, 3, 33, 40))):
        model = esc_arch.PRESETS[preset](2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10)) * 0.02)
        model.eval()
        with torch.inference_mode():
            out = model(x)
            tiled = model(x, TiledMaps(32, window=model.window_size))
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(native, "_load", lambda: (None, "switched off for the comparison"))
                reference = model(x)
        assert (out - reference).abs().max().item() <= 2e-5, preset
        assert (tiled - out).abs().max().item() <= 2e-5, preset


def test_every_kernel_file_is_built_and_keys_the_cache() -> None:
    """A change to any source or header gives a new build (its hash is the library's name), and the package ships
    them all."""
    files = {p.name for p in native.KERNELS.iterdir() if p.suffix in (".cpp", ".h")}
    assert {p.name for p in native.SOURCES} | {p.name for p in native.HEADERS} == files
    import ast  # noqa: PLC0415
    import fnmatch  # noqa: PLC0415

    # the package-data line of pyproject.toml (a TOML array of strings reads as a Python list; tomllib is 3.11+)
    line = next(row for row in (REPO / "pyproject.toml").read_text().splitlines() if row.startswith("esc_arch = ["))
    patterns = ast.literal_eval(line.split("=", 1)[1].strip())
    assert all(any(fnmatch.fnmatch(f"kernels/{name}", pattern) for pattern in patterns) for name in files)


@NEEDS_KERNEL
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("with_add", [False, True])
def test_native_projection_equals_layer_norm_then_linear(with_norm, with_add) -> None:
    """The attention's to_qkv with the block's LayerNorm fused in front, and to_out with the residual: rows of
    pixels (97 of them: not a whole number of the kernel's chunks)."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(97, 64, generator=generator) * 3 + 1
    weight, bias = torch.randn(192, 64, generator=generator) * 0.1, torch.randn(192, generator=generator)
    norm = LayerNorm2d(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(64, generator=generator))
    add = torch.randn(97, 192, generator=generator) if with_add else None
    with torch.inference_mode():
        out = native.linear_rows(x, weight, bias, norm=norm if with_norm else None, add=add)
    rows = F.layer_norm(x.double(), (64,), norm.weight.double(), norm.bias.double(), norm.eps) if with_norm else x.double()
    expected = rows @ weight.double().t() + bias.double() + (0 if add is None else add.double())
    assert (out.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


@NEEDS_KERNEL
def test_fused_ffn_applies_the_layer_norm_in_front() -> None:
    ffn = _ffn(64, 1.25)
    norm = LayerNorm2d(64)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(64, generator=generator))
    x = torch.randn(1, 64, 13, 22, generator=generator) * 2 + 1
    with torch.inference_mode():
        out = ffn(x, norm=norm)
    normed = F.layer_norm(x.double().permute(0, 2, 3, 1), (64,), norm.weight.double(), norm.bias.double(), norm.eps)
    expected = _plain_ffn(ffn, normed.permute(0, 3, 1, 2), None)
    assert (out.double() - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()
