"""The shared large kernel by overlap-save FFT (esc_runtime.spectral): the same correlation as the direct convolutions,
taken by a prepared model for fp32 CPU inference on maps large enough to repay it, and never by the plain model
(training, tracing and export), by other dtypes or against the user's switch. The golden fixtures pass on it (their
inputs are small, so the size floor is lowered).

It is the CPU path where the native correlation (esc_runtime.native, tests/test_native.py) is not built: every model
here is prepared with it disabled, as a machine without a compiler or AVX-512 has it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import esc_arch
import esc_runtime
from esc_arch.layers import per_sample_depthwise_conv
from esc_runtime import spectral
from esc_runtime.layers import PARTIAL_CONV
from esc_runtime.streaming import TiledMaps
from golden import checkpoint_path, golden_cases, tensors

FFT_OP = "aten::_fft_r2c"
FFT = next(impl for impl in PARTIAL_CONV if impl.name == "fft")


def _prepare(model, *args, **kwargs) -> esc_runtime.PreparedModel:
    """The model prepared as where the native correlation is not built."""
    return esc_runtime.prepare(model, *args, disable=("native",), **kwargs)


@pytest.fixture
def every_size(monkeypatch):
    """The FFT path on maps of any size (the floor keeps small maps direct, where they are faster)."""
    monkeypatch.setattr(spectral, "MIN_PIXELS", 0)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _direct(x, kernel, dynamic):
    k = kernel.shape[-1]
    return F.conv2d(x, kernel, padding=k // 2) + per_sample_depthwise_conv(x, dynamic, padding=1)


@pytest.mark.parametrize("batch, channels, height, width, k", [
    (1, 16, 180, 200, 13),  # ESC: not a multiple of the block's 52 valid outputs
    (2, 8, 130, 140, 13),  # a batch: each sample with its own dynamic kernel
    (1, 4, 129, 300, 17),  # another kernel size, another block
    (1, 48, 128, 130, 13),  # ESC-XL's channels
])
def test_correlation_equals_the_direct_convolutions(batch, channels, height, width, k):
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(batch, 4 * channels, height, width, generator=generator)
    x = full.contiguous(memory_format=torch.channels_last)[:, :channels]  # the strided slice the model passes
    kernel = torch.randn(channels, channels, k, k, generator=generator) * 0.05
    dynamic = torch.randn(batch, channels, 3, 3, generator=generator) * 0.1
    expected = _direct(x.double(), kernel.double(), dynamic.double())
    out = torch.full_like(expected, float("nan"), dtype=torch.float32)
    with torch.inference_mode():
        assert FFT_OP in _ops(lambda: spectral.SpectralKernel(kernel).correlate(x, dynamic, out=out))
        direct = _direct(x, kernel, dynamic)
    assert out.isfinite().all()
    # Both float32 routes are within float rounding of float64; the FFT is the closer of the two here.
    assert (out.double() - expected).abs().max().item() <= 2e-5 * expected.abs().max().item()
    assert (out.double() - expected).abs().max() <= (direct.double() - expected).abs().max()


def test_a_small_map_runs_direct():
    # the kernel a prepared model's forward pass prepares keeps no spectrum below the floor: the maps run direct
    large = torch.zeros(8, 8, 13, 13)
    assert isinstance(FFT.prepare_kernel(large, torch.zeros(1, 8, 64, 64)), torch.Tensor)
    assert isinstance(FFT.prepare_kernel(large, torch.zeros(1, 8, 128, 128)), spectral.SpectralKernel)
    assert isinstance(spectral.prepare(torch.zeros(8, 8, 13, 13), torch.zeros(1, 8, 64, 64)), torch.Tensor)
    kernel = torch.randn(8, 8, 13, 13)
    x, dynamic = torch.randn(1, 8, 64, 64), torch.randn(1, 8, 3, 3)
    out = torch.empty(1, 8, 64, 64)
    with torch.inference_mode():
        prepared = spectral.SpectralKernel(kernel)  # a tile of a streamed pass below the floor: direct as well
        assert FFT_OP not in _ops(lambda: prepared.correlate(x, dynamic, out=out))
        assert torch.allclose(out, _direct(x, kernel, dynamic))


def test_blocks_are_powers_of_two_of_four_overlaps():
    assert spectral.block_size(13) == 64  # every ESC variant
    assert spectral.block_size(31) == 128
    for k in (11, 13, 17, 31, 45):
        n = spectral.block_size(k)
        assert n >= 4 * (k - 1) and n & (n - 1) == 0


def _model(preset: str = "esc_tiny", **overrides):
    model = esc_arch.PRESETS[preset](4, **overrides)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)  # the dynamic kernels start at zero
    return model.eval()


def test_a_prepared_model_takes_it_the_plain_model_never_does(monkeypatch):
    model = _model()
    x = torch.rand(1, 3, 136, 150, generator=torch.Generator().manual_seed(1))
    prepared = _prepare(model)
    assert prepared.plan.partial_conv.name == "fft"
    with torch.inference_mode():
        assert FFT_OP in _ops(lambda: prepared(x))
        out = prepared(x)
        assert FFT_OP not in _ops(lambda: model(x))
        plain = model(x)
    assert (out - plain).abs().max().item() <= 1e-5
    monkeypatch.setattr(spectral, "enabled", lambda: False)  # what ESC_SR_FFT=0 does for a process
    switched_off = _prepare(model)
    choice = switched_off.plan.choices["partial convolution"]
    assert choice.implementation.name != "fft"
    assert ("fft", "switched off (ESC_SR_FFT=0)") in choice.rejected
    with torch.inference_mode():
        assert FFT_OP not in _ops(lambda: switched_off(x))
        expected = switched_off(x)
    assert (out - expected).abs().max().item() <= 1e-5


def test_disabling_it_is_the_callers_choice_too():
    prepared = esc_runtime.prepare(_model(), disable=("native", "fft"))
    choice = prepared.plan.choices["partial convolution"]
    assert choice.implementation.name != "fft" and ("fft", "disabled by the caller") in choice.rejected


def test_layer_streamed_tiles_match_the_whole_map(every_size):
    prepared = _prepare(_model())
    x = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = prepared(x)
        assert FFT_OP in _ops(lambda: prepared(x, TiledMaps(32, window=16)))
        tiled = prepared(x, TiledMaps(32, window=16))
    assert (tiled - whole).abs().max().item() <= 1e-5


def test_training_tracing_and_half_precision_stay_direct(every_size):
    """Training, tracing and export use the plain model, which has no FFT op; a half-precision model is prepared
    without it."""
    model = _model()
    x = torch.rand(1, 3, 32, 32)
    model.train()
    assert FFT_OP not in _ops(lambda: model(x).mean().backward())
    assert model.plk_filter.grad is not None
    model.eval()
    with torch.no_grad():
        assert FFT_OP not in _ops(lambda: model(x))
        traced = torch.jit.trace(model, x, check_trace=False)
    assert "fft" not in str(traced.inlined_graph)
    half = _prepare(model, "cpu", torch.bfloat16)
    choice = half.plan.choices["partial convolution"]
    assert choice.implementation.name != "fft"
    assert ("fft", "float32 CPU inference only (this is torch.bfloat16 on cpu)") in choice.rejected
    with torch.inference_mode():
        assert FFT_OP not in _ops(lambda: half(x.bfloat16()))
    kernel = torch.zeros(8, 8, 13, 13, dtype=torch.bfloat16)
    assert not spectral.applies(x.bfloat16(), kernel)


@pytest.mark.parametrize("case", [c for c in golden_cases() if c["id"] in ("esc_x4", "esc_xl_shaped_x4", "lte_esc",
                                                                            "escrealm_dysample_x4")],
                         ids=lambda c: c["id"])
def test_golden_cases_on_the_fft_path(case, every_size):
    prepared = _prepare(esc_arch.load_model(checkpoint_path(case)))
    assert prepared.plan.partial_conv.name == "fft"
    data = tensors(case)
    for run in case["runs"]:
        inputs = [data[name] for name in run["inputs"].values()]
        assert FFT_OP in _ops(lambda: prepared(*inputs))
        out = prepared(*inputs)
        assert (out - data[run["output"]]).abs().max().item() <= 1e-4, run["output"]
