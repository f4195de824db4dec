"""CPU inference on oneDNN (esc_runtime.onednn): channels-last maps, 1x1 convolutions as fused oneDNN matmuls and the
other convolutions with their GELU or residual fused in give the outputs of the plain PyTorch path, are taken by a
prepared model exactly where they may be (fp32 CPU inference), and never by the plain model (training, tracing and
export use it) or against the user's switch.

Every model here is prepared with the native kernels disabled (esc_runtime.native, tests/test_native.py), as a
machine without a compiler or AVX-512 has them: the oneDNN path is what runs there."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esc_arch
import esc_runtime
from esc_arch.layers import ConvFFN, LayerNorm2d
from esc_runtime import onednn, switches
from esc_runtime.layers import Target

X86 = platform.machine().lower() in ("x86_64", "amd64")
# Where the path must be on: an x86-64 torch built with oneDNN (CI's machine), unless this environment turned it off.
# Elsewhere every test below checks the other side: the plain path runs, with the same outputs.
EXPECTED = X86 and torch.backends.mkldnn.is_available() and switches.enabled("ESC_SR_ONEDNN")
FUSED_OP = "mkldnn::_linear_pointwise"


@pytest.fixture
def plain(monkeypatch):
    """``plain(True)``: the plain PyTorch path inside a test (what ``ESC_SR_ONEDNN=0`` does for a process; a model
    prepared then chooses without oneDNN, and the fused operators fall back); ``plain(False)``: back to what this
    platform offers."""
    real = onednn.available

    def use(on: bool) -> None:
        monkeypatch.setattr(onednn, "available", (lambda: False) if on else real)

    return use


def _prepare(model: nn.Module) -> esc_runtime.PreparedModel:
    return esc_runtime.prepare(model, disable=("native",))


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """The constructor's initialisation, perturbed so that zero-initialised layers (the dynamic kernels) act too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def test_the_path_is_available_exactly_on_an_x86_torch_with_onednn():
    assert onednn.available() is EXPECTED


VARIANTS = [("esc", 4), ("esc_fp", 2), ("esc_real", 4), ("esc_xl", 2), ("esc_lte", None)]


def _runner(model):
    x = torch.rand(1, 3, 21, 30, generator=torch.Generator().manual_seed(1))  # not a window multiple: crops too
    return (lambda: model.upscale_by(x, size=(50, 70))) if model.arbitrary_scale else (lambda: model(x))


@pytest.mark.parametrize("preset, scale", VARIANTS)
def test_prepared_inference_equals_the_plain_path(preset, scale, plain):
    kwargs = {} if scale is None else {"scale": scale}
    overrides = {"window_size": 8, "n_blocks": 2} if preset != "esc_xl" else {"window_size": 16, "n_blocks": 1}
    model = esc_arch.fuse(_random_weights(esc_arch.PRESETS[preset](**kwargs, **overrides)))
    with torch.inference_mode():
        plain(True)
        switched_off = _prepare(model)
        assert switched_off.plan.ffn.name == "module" and switched_off.plan.convolution.name == "module"
        expected = _runner(switched_off)()
        assert FUSED_OP not in _ops(_runner(switched_off))
        plain(False)
        assert FUSED_OP not in _ops(_runner(model))  # the plain model never takes it
        reference = _runner(model)()
        prepared = _prepare(model)
        assert (prepared.plan.ffn.name == "onednn") is EXPECTED
        assert (prepared.plan.convolution.name == "onednn") is EXPECTED
        assert (FUSED_OP in _ops(_runner(prepared))) is EXPECTED
        out = _runner(prepared)()
    assert out.shape == expected.shape == reference.shape
    scale = max(1.0, expected.abs().max().item())
    assert (out - expected).abs().max().item() <= 1e-5 * scale
    assert (out - reference).abs().max().item() <= 1e-5 * scale


def test_a_batch_and_channels_last_outputs_of_a_block_stage():
    """The FFN implementation a prepared model runs: ``ffn(norm(x)) + residual``, its output channels-last."""
    ffn = _random_weights(ConvFFN(16, 3, 1.25)).eval()
    norm = _random_weights(LayerNorm2d(16)).eval()
    x = torch.randn(3, 16, 9, 11)
    residual = torch.randn(3, 16, 9, 11)
    choice = esc_runtime.choose("ConvFFN", ffn, Target(torch.device("cpu"), torch.float32), disable=("native",))
    assert (choice.implementation.name == "onednn") is EXPECTED
    with torch.no_grad():  # no_grad takes the path as inference_mode does
        expected = ffn(x) + residual
        out = choice.implementation(ffn, x, add=residual)
        normed = choice.implementation(ffn, x, norm=norm, add=residual)
        expected_normed = ffn(norm(x)) + residual
    assert out.is_contiguous(memory_format=torch.channels_last) is EXPECTED  # (LayerNorm2d's output is either way)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(normed, expected_normed, atol=1e-5, rtol=1e-5)


def test_training_and_grad_enabled_calls_stay_on_plain_pytorch():
    """Training uses the plain model, which has no oneDNN operator."""
    model = esc_arch.PRESETS["esc_tiny"](window_size=8)
    x = torch.rand(2, 3, 16, 16)
    ops = _ops(lambda: model(x).mean().backward())
    assert FUSED_OP not in ops and "mkldnn::_convolution_pointwise" not in ops
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tracing_sees_plain_convolutions():
    """Tracing and export use the plain model, which has no oneDNN operator."""
    model = esc_arch.fuse(esc_arch.PRESETS["esc_tiny"](window_size=8))
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.rand(1, 3, 16, 16), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "_linear_pointwise" not in graph and "_convolution_pointwise" not in graph


CONVOLUTIONS = {"3x3": nn.Conv2d(8, 8, 3, padding=1), "depthwise 3x3": nn.Conv2d(8, 8, 3, padding=1, groups=8),
                "1x1": nn.Conv2d(8, 8, 1)}


@pytest.mark.parametrize("name", CONVOLUTIONS)
@pytest.mark.parametrize("epilogue", ["none", "gelu", "add"])
def test_a_convolution_and_its_gelu_or_addition_are_one_onednn_operator(name, epilogue, plain):
    conv = CONVOLUTIONS[name]
    x, residual = torch.randn(2, 8, 9, 11), torch.randn(2, 8, 9, 11)
    kwargs = {"gelu": epilogue == "gelu", "add": residual if epilogue == "add" else None}
    fused_op = FUSED_OP if name == "1x1" else "mkldnn::_convolution_pointwise"
    with torch.no_grad():
        plain(True)
        expected = onednn.conv(conv, x, **kwargs)
        assert torch.allclose(expected, {"none": conv(x), "gelu": F.gelu(conv(x)), "add": conv(x) + residual}[epilogue])
        plain(False)
        out = onednn.conv(conv, x, **kwargs)
        assert (fused_op in _ops(lambda: onednn.conv(conv, x, **kwargs))) is EXPECTED
    assert out.is_contiguous(memory_format=torch.channels_last) is EXPECTED
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_other_dtypes_and_padding_modes_fall_back():
    reflecting = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(onednn.conv(reflecting, x), reflecting(x))  # oneDNN pads with zeros only
        assert not onednn.applies(x.to(torch.bfloat16))
        assert not onednn.applies(x.to(torch.float64))
    with pytest.raises(ValueError, match="GELU or an addition"):
        onednn.conv(nn.Conv2d(8, 8, 1), x, gelu=True, add=x)


def test_switching_onednn_off_in_torch_turns_it_off():
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert not onednn.applies(x)
        prepared = _prepare(esc_arch.esc_tiny(4).eval())
    assert prepared.plan.ffn.name == "module" and prepared.plan.convolution.name == "module"
    if EXPECTED:
        assert ("onednn", "oneDNN is switched off (torch.backends.mkldnn)") in prepared.plan.choices["ConvFFN"].rejected


def test_the_environment_switch_turns_it_off():
    probe = ("import esc_arch, esc_runtime; from esc_runtime import onednn; "
             "prepared = esc_runtime.prepare(esc_arch.esc_tiny(4).eval(), disable=('native',)); "
             "print(onednn.available(), prepared.plan.ffn.name, prepared.plan.convolution.name)")
    env = {**os.environ, "ESC_SR_ONEDNN": "0"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip().splitlines()[-1] == "False module module"
