"""ESC's layers as small native kernels for CPU inference, built on first use for this machine: window attention,
the ConvFFN, the partial convolution with its projection, and the attention's input projection with its LayerNorm.

Why. On CPU, half of an ESC forward pass was window attention inside torch's CPU flash kernel, whose q·kᵀ and p·v
GEMMs (head dimension 16, 1,024 keys) run far below the core's peak and which reads the bias as a
(heads, ws², ws²) matrix. ESC's shapes allow a much simpler kernel (``kernels/window_attention.cpp``): a head is
one 16-float vector register, a query's bias over one key row is ws consecutive floats of the (2ws-1)² table, and
the window's tokens can be read straight from the raster-order ``to_qkv`` output, so neither the partition of the
map into windows nor the way back is a copy. The ConvFFN (``kernels/conv_ffn.cpp``) was four oneDNN passes over
maps of its hidden width; fused row by row, the hidden maps stay in the core's cache. The partial convolution
(``kernels/symmetric_conv.cpp``) uses the symmetry of ESC's geometric-ensembled 13x13 kernel: 28 orbits instead of
169 taps, then the block's 1x1 projection on the row in cache. ``kernels/linear_rows.cpp`` runs ``to_qkv`` with the
LayerNorm in front of it in one pass.

Measured on the 2-core AMD EPYC VM (AVX-512, 2 threads, interleaved; ``benchmarks/README.md``, "Native CPU
kernels"): window attention of one ESC layer at window 32 on a 192x320 map 113 against torch's 200-217 ms (q·kᵀ
and p·v near the core's FMA peak); ESC's conv-stage FFN 13.0 against 17.9 ms; the 13x13 correlation 9.7 against
17.1 ms (FFT) and 23.5 ms (oneDNN); ``to_qkv`` with its LayerNorm 14.5 against 30 ms. An ESC x4 forward pass at
180x320: 1.47 against 2.19 s with torch's operators (0.67x); outputs within 4.8e-6 of torch's path.

How. The C++ sources (plain C ABI, no torch headers) are compiled once per machine with ``c++ -O3 -march=native
-fopenmp`` (``CXX`` overrides the compiler) into ``$ESC_SR_CACHE`` or ``~/.cache/esc_sr``, keyed by a hash of the
sources and headers, the compiler, its flags and the CPU's flags, written atomically so that concurrent processes (torchrun)
can build side by side, and loaded with ctypes, which releases the GIL during the call. Their threads are OpenMP's:
loaded after torch, the library shares torch's ``libgomp.so.1`` and so its thread pool (threads of their own
competed with torch's spinning ones: the FFN took 19 ms at 2 threads instead of 13.5). Each call uses torch's
thread count.

When. :func:`applies` (attention), :func:`takes_ffn` and :func:`prepare_symmetric`: a float32 CPU tensor without
autograd and outside tracing or export, an x86-64 Linux machine whose build targets AVX-512 (where it was
measured), ``ESC_SR_NATIVE`` not ``0`` in the environment; for attention head dimension 16 and a window that is a
multiple of 16, for the FFN a multiple of 16 channels and a 3x3 depthwise kernel, for the partial convolution a
square kernel symmetric under the square's flips and rotations (the caller's guarantee: ESC's geometric ensemble)
and, for its fused projection, a multiple of 16 channels (every ESC variant and the default model qualify; ESC-FP's
decomposed kernel keeps torch's path). Elsewhere (no
compiler, a failed build, other CPUs) torch's operators run as before; a build that fails says so once in a
warning, and :func:`status` says why the kernels are or are not in use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from . import onednn

__all__ = ["HEAD_DIM", "SymmetricKernel", "applies", "available", "conv_ffn", "linear_rows", "prepare_symmetric",
           "status", "takes", "takes_ffn", "window_attention"]

#: The only head dimension the kernel takes (every ESC variant's: dim / heads = 16).
HEAD_DIM = 16
#: The profiler event each window-attention call records (the native calls are invisible to it otherwise).
WINDOW_ATTENTION_EVENT = "esc_native_window_attention"
LOG2_E = 1.4426950408889634
KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "window_attention.cpp", KERNELS / "conv_ffn.cpp", KERNELS / "symmetric_conv.cpp",
           KERNELS / "linear_rows.cpp")
HEADERS = (KERNELS / "vector.h", KERNELS / "gemm.h")
# -fopenmp: the kernels' threads are OpenMP's, and the library is loaded after torch, whose libgomp.so.1 it then
# shares (one thread pool: no second set of threads competing with torch's spinning ones).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp")


def _cache_dir() -> Path:
    if os.environ.get("ESC_SR_CACHE"):
        return Path(os.environ["ESC_SR_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "esc_sr" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux): a library built with -march=native must not be loaded on another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _build(compiler: str, folder: Path) -> Path:
    """Compile the kernels into ``folder`` unless a build of the same inputs is there; return the library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    parts = [path.read_bytes() for path in (*SOURCES, *HEADERS)] + [version.encode(), " ".join(FLAGS).encode(),
                                                                     _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    library = folder / f"esc_kernels-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        os.replace(built, library)  # atomic: a concurrent build of the same key replaces it with the same bytes
    return library


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None, and why (built at most once per process)."""
    if os.environ.get("ESC_SR_NATIVE", "").strip() == "0":
        return None, "switched off (ESC_SR_NATIVE=0)"
    if not (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")):
        return None, f"not built on {sys.platform}/{platform.machine()} (measured on x86-64 Linux only)"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler (c++ or g++, or $CXX) to build it"
    try:
        try:
            library = _build(compiler, _cache_dir())
        except OSError:  # a read-only home: build into a private temporary folder instead
            library = _build(compiler, Path(tempfile.mkdtemp(prefix="esc_sr_kernels_")))
        lib = ctypes.CDLL(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"esc_arch: the native CPU kernels were not built ({error}); torch's operators run instead",
                      RuntimeWarning, stacklevel=3)
        return None, f"build failed: {error}"
    lib.esc_window_attention.restype = ctypes.c_int
    lib.esc_window_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    lib.esc_conv_ffn.restype = ctypes.c_int
    lib.esc_conv_ffn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2 + \
        [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.esc_symmetric_correlate.restype = ctypes.c_int
    lib.esc_symmetric_correlate.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    lib.esc_partial_conv_attention.restype = ctypes.c_int
    lib.esc_partial_conv_attention.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 4
    lib.esc_linear_rows.restype = ctypes.c_int
    lib.esc_linear_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int]
    if lib.esc_window_attention_vector_bits() != 512:
        return None, "this CPU has no AVX-512 (the kernels were measured on AVX-512 only)"
    return lib, f"built for this CPU ({library.name})"


def available() -> bool:
    """Whether this process can run the native kernels (built or loaded on first call)."""
    return _load()[0] is not None


def status() -> str:
    """Why the native kernels are or are not in use, in one line."""
    return _load()[1]


def _inference(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` is one the kernels serve: float32 on the CPU, no autograd, not traced or exported, and
    the kernels available."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
        and not onednn.tracing() and available()


def takes(device: torch.device | str, dtype: torch.dtype, *, head_dim: int, window: int) -> bool:
    """Whether attention inference on ``device``/``dtype`` with this head dimension and window runs natively."""
    return head_dim == HEAD_DIM and window % 16 == 0 and torch.device(device).type == "cpu" \
        and dtype == torch.float32 and available()


def applies(x: torch.Tensor, *, head_dim: int, window: int) -> bool:
    """Whether window attention over ``x`` (the layer's input) takes the kernel: :func:`takes`, without autograd and
    outside tracing or export."""
    return head_dim == HEAD_DIM and window % 16 == 0 and _inference(x)


def window_attention(qkv: torch.Tensor, table: torch.Tensor, *, batch: int, height: int, width: int, heads: int,
                     window: int) -> torch.Tensor:
    """Attend every window of a ``(batch, height, width)`` map (sides multiples of ``window``).

    ``qkv``: the ``to_qkv`` projection as raster-order rows ``(batch * height * width, 3 * heads * 16)``, contiguous;
    ``table``: the ``(heads, (2 window - 1)^2)`` relative-position bias table. Returns the attended rows
    ``(batch * height * width, heads * 16)`` in the same order, channels ``(head, c)``: what ``to_out`` reads.
    """
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    dim = heads * HEAD_DIM
    if qkv.shape != (batch * height * width, 3 * dim) or not qkv.is_contiguous() or qkv.dtype != torch.float32:
        raise ValueError(f"qkv must be contiguous float32 rows of shape {(batch * height * width, 3 * dim)}, "
                         f"got {tuple(qkv.shape)}")
    scaled_table = (table.detach().to(torch.float32) * LOG2_E).contiguous()  # scores are kept in base 2
    out = qkv.new_empty(batch * height * width, dim)
    with torch.profiler.record_function(WINDOW_ATTENTION_EVENT):
        code = lib.esc_window_attention(qkv.data_ptr(), scaled_table.data_ptr(), out.data_ptr(), batch, height,
                                        width, heads, window, torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native kernel does not take a {height}x{width} map with window {window}")
    if code == 2:
        raise MemoryError("the native window-attention kernel could not allocate its buffers")
    return out


def takes_ffn(x: torch.Tensor, *, channels: int, hidden: int, kernel_size: int) -> bool:
    """Whether a ConvFFN over ``x`` runs on the fused kernel: inference as for :func:`applies`, channels a multiple of
    16 (the hidden channels are padded to one), and a 3x3 depthwise convolution."""
    return channels % 16 == 0 and kernel_size == 3 and hidden > 0 and _inference(x)


def _padded(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``, contiguous."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim).contiguous()


def conv_ffn(x: torch.Tensor, expand: torch.nn.Conv2d, depthwise: torch.nn.Conv2d, project: torch.nn.Conv2d,
             add: torch.Tensor | None = None, *, norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """``project(GELU(depthwise(h)) + h) (+ add)`` with ``h = GELU(expand(norm(x)))``: ESC's ConvFFN (and the
    LayerNorm in front of it, per pixel over its channels, where given) in one fused pass.

    ``x`` and ``add``: ``(b, channels, h, w)`` maps (made channels-last); returns a channels-last map. The weights
    are transposed and their hidden channels padded to whole vectors of 16 for each call (a few small copies).
    """
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    b, c, h, w = x.shape
    hidden = expand.out_channels
    padded = -(-hidden // 16) * 16
    detach = [t.detach() for t in (expand.weight, expand.bias, depthwise.weight, depthwise.bias, project.weight,
                                   project.bias)]
    expand_t = _padded(detach[0].view(hidden, c).t(), padded, 1)
    expand_bias = _padded(detach[1], padded, 0)
    taps = _padded(detach[2].view(hidden, 9).t(), padded, 1)
    taps_bias = _padded(detach[3], padded, 0)
    project_t = _padded(detach[4].view(c, hidden).t(), padded, 0)
    project_bias = detach[5].contiguous()
    norm_weight = None if norm is None else norm.weight.detach().contiguous()
    norm_bias = None if norm is None else norm.bias.detach().contiguous()
    x = x.contiguous(memory_format=torch.channels_last)
    if add is not None:
        add = add.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    with torch.profiler.record_function("esc_native_conv_ffn"):
        code = lib.esc_conv_ffn(x.data_ptr(), expand_t.data_ptr(), expand_bias.data_ptr(), taps.data_ptr(),
                                taps_bias.data_ptr(), project_t.data_ptr(), project_bias.data_ptr(),
                                None if add is None else add.data_ptr(), out.data_ptr(), b, h, w, c, padded,
                                None if norm is None else norm_weight.data_ptr(),
                                None if norm is None else norm_bias.data_ptr(),
                                float(norm.eps) if norm is not None else 0.0, torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native ConvFFN does not take {c} channels ({hidden} hidden)")
    if code == 2:
        raise MemoryError("the native ConvFFN could not allocate its buffers")
    return out


def _orbits(kernel_size: int) -> torch.Tensor:
    """``(k, k)``: each offset's orbit under the square's flips and rotations, numbered as the kernel numbers them
    (``a (a + 1) / 2 + b`` with ``a >= b`` the offset's larger and smaller distance from the centre)."""
    r = torch.arange(kernel_size) - kernel_size // 2
    dy, dx = r.abs().view(-1, 1).expand(kernel_size, kernel_size), r.abs().view(1, -1).expand(kernel_size, kernel_size)
    a, b = torch.maximum(dy, dx), torch.minimum(dy, dx)
    return a * (a + 1) // 2 + b


class SymmetricKernel:
    """A large kernel that is the same at every position of each orbit of the square's symmetries (ESC's geometric
    ensemble), by orbit, for :func:`esc_runtime.native`'s correlation (``kernels/symmetric_conv.cpp``).

    Built once per forward pass (:func:`prepare_symmetric`); ``correlate`` does what ``F.conv2d(x, kernel,
    padding=k // 2)`` plus a per-sample depthwise 3x3 convolution do, as :class:`esc_runtime.spectral.SpectralKernel`.
    Each orbit's weight is the mean of the kernel over the orbit (equal to every member up to float rounding).
    """

    def __init__(self, kernel: torch.Tensor) -> None:
        self.kernel = kernel
        out_channels, in_channels, k, _ = kernel.shape
        self.padded = -(-in_channels // 16) * 16
        orbit = _orbits(k).flatten()
        count = int(orbit.max()) + 1
        taps = kernel.detach().float().permute(2, 3, 1, 0).reshape(k * k, in_channels, out_channels)
        means = taps.new_zeros(count, in_channels, out_channels).index_add_(0, orbit, taps)
        means /= torch.bincount(orbit, minlength=count).view(-1, 1, 1).to(means.dtype)
        weights = means.new_zeros(count, self.padded, self.padded)
        weights[:, :in_channels, :out_channels] = means
        self.weights = weights.view(count * self.padded, self.padded)

    def correlate(self, x: torch.Tensor, dynamic: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """Write the correlation of ``x`` (``(b, c, h, w)``) plus each sample's depthwise 3x3 ``dynamic`` kernel
        (``(b, c, 3, 3)``, padding 1) into ``out`` (``(b, c, h, w)``); both with channels as their innermost axis."""
        lib = _load()[0]
        if lib is None:
            raise RuntimeError(f"the native CPU kernels are not available: {status()}")
        b, c, h, w = x.shape
        if x.stride(1) != 1:
            x = x.contiguous(memory_format=torch.channels_last)
        if out.stride(1) != 1:
            raise ValueError("out must have channels as its innermost axis (a channels-last map or a slice of one)")
        taps = self._taps(dynamic)  # held in a name: it must outlive the call
        strides = [(ctypes.c_int64 * 3)(t.stride(0), t.stride(2), t.stride(3)) for t in (x, out)]
        with torch.profiler.record_function("esc_native_symmetric_correlate"):
            code = lib.esc_symmetric_correlate(x.data_ptr(), strides[0], self.weights.data_ptr(), taps.data_ptr(),
                                               out.data_ptr(), strides[1], b, h, w, c, self.kernel.shape[-1] // 2,
                                               torch.get_num_threads())
        if code == 1:
            raise ValueError(f"the native correlation does not take a {tuple(x.shape)} map")
        if code == 2:
            raise MemoryError("the native correlation could not allocate its buffers")
        return out

    def _taps(self, dynamic: torch.Tensor) -> torch.Tensor:
        """``(b, c, 3, 3)`` per-sample kernels as the native code reads them: ``(b, 9, c padded to 16)``."""
        b, c = dynamic.shape[:2]
        taps = dynamic.new_zeros(b, 9, self.padded)
        taps[:, :, :c] = dynamic.detach().reshape(b, c, 9).transpose(1, 2)
        return taps

    def partial_conv_attention(self, x: torch.Tensor, dynamic: torch.Tensor, project: torch.nn.Conv2d,
                               add: torch.Tensor | None = None) -> torch.Tensor:
        """ESC's partial convolution and its 1x1 projection in one pass: ``project(cat([correlate(x[:, :c]) +
        depthwise(x[:, :c], dynamic), x[:, c:]])) (+ add)``, ``c`` the kernel's channels; returns a channels-last map.
        The concatenated map is never written (each row is projected from the core's cache)."""
        lib = _load()[0]
        if lib is None:
            raise RuntimeError(f"the native CPU kernels are not available: {status()}")
        b, dim, h, w = x.shape
        x = _pixels_last(x)
        add = None if add is None else _pixels_last(add)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        weight = project.weight.detach().reshape(dim, dim).t().contiguous()
        bias = project.bias.detach().contiguous()
        taps = self._taps(dynamic)  # every tensor passed by address is held in a name until the call returns
        strides = [(ctypes.c_int64 * 3)(t.stride(0), t.stride(2), t.stride(3)) for t in (x, x if add is None else add, out)]
        with torch.profiler.record_function("esc_native_partial_conv_attention"):
            code = lib.esc_partial_conv_attention(
                x.data_ptr(), strides[0], self.weights.data_ptr(), taps.data_ptr(), weight.data_ptr(),
                bias.data_ptr(), None if add is None else add.data_ptr(), strides[1], out.data_ptr(), strides[2], b, h,
                w, self.kernel.shape[0], dim, self.kernel.shape[-1] // 2, torch.get_num_threads())
        if code == 1:
            raise ValueError(f"the native partial convolution does not take {dim} channels with a "
                             f"{self.kernel.shape[0]}-channel kernel")
        if code == 2:
            raise MemoryError("the native partial convolution could not allocate its buffers")
        return out


def _pixels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each pixel's channels consecutive (``stride(1) == 1``, ``stride(3) == channels``): as it is when it
    is a channels-last map or a tile cut from one, else a channels-last copy."""
    if x.stride(1) == 1 and x.stride(3) == x.shape[1]:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def prepare_symmetric(kernel: torch.Tensor, x: torch.Tensor) -> SymmetricKernel | None:
    """``kernel`` (``(c, c, k, k)``, symmetric under the square's flips and rotations: the caller's guarantee, as for
    ESC's geometric ensemble) by orbit, where the forward pass on ``x`` runs the native correlation; else None."""
    if kernel.dim() != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[-1] % 2 == 0 or kernel.shape[-1] < 3:
        return None
    if kernel.dtype != torch.float32 or not _inference(x):
        return None
    return SymmetricKernel(kernel)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, norm: torch.nn.LayerNorm | None = None,
                add: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x) @ weight.T + bias (+ add)`` for ``(rows, in)`` pixels: a 1x1 convolution (``weight`` ``(out, in)``,
    ``out`` a multiple of 16) on a channels-last map's rows, with its LayerNorm over each pixel's channels fused in
    front (never written out) and the residual added. Inference only, as every native call."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {status()}")
    rows, inputs = x.shape
    outputs = weight.shape[0]
    x = x.contiguous()
    weight_t = weight.detach().reshape(outputs, inputs).t().contiguous()
    bias = bias.detach().contiguous()
    norm_weight = None if norm is None else norm.weight.detach().contiguous()
    norm_bias = None if norm is None else norm.bias.detach().contiguous()
    add = None if add is None else add.contiguous()
    out = x.new_empty(rows, outputs)
    with torch.profiler.record_function("esc_native_linear_rows"):
        code = lib.esc_linear_rows(x.data_ptr(), rows, inputs, weight_t.data_ptr(), bias.data_ptr(), outputs,
                                   None if norm is None else norm_weight.data_ptr(),
                                   None if norm is None else norm_bias.data_ptr(),
                                   float(norm.eps) if norm is not None else 0.0,
                                   None if add is None else add.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if code == 1:
        raise ValueError(f"the native 1x1 convolution does not take {inputs} -> {outputs} channels")
    if code == 2:
        raise MemoryError("the native 1x1 convolution could not allocate its buffers")
    return out
