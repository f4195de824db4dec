"""The CPU sdpa layout a prepared model runs for ``WindowAttention`` (esc_runtime.layers, "sdpa-cpu-layout": its own
layout, GEMM projections) computes what the naive reference computes, odd sizes, batches, large and small windows; the
plain sdpa module, which training uses, has the naive reference's outputs and gradients."""

from __future__ import annotations

import pytest
import torch

import esc_runtime
from esc_arch.attention import WindowAttention, relative_position_index
from esc_arch.layers import LayerNorm2d
from esc_runtime.layers import Target

CPU_FP32 = Target(torch.device("cpu"), torch.float32)


def _layout(layer: WindowAttention):
    """The implementation a prepared model runs ``layer`` with on fp32 CPU where the native kernel is not built."""
    implementation = esc_runtime.choose("window attention", layer, CPU_FP32, disable=("native",)).implementation
    assert implementation.name == "sdpa-cpu-layout"
    return implementation


def _pair(dim: int, window: int, heads: int, seed: int = 0) -> tuple[WindowAttention, WindowAttention]:
    generator = torch.Generator().manual_seed(seed)
    sdpa = WindowAttention(dim, window, heads, "sdpa")
    with torch.no_grad():
        for p in sdpa.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    naive = WindowAttention(dim, window, heads, "naive")
    naive.load_state_dict(sdpa.state_dict())
    return sdpa, naive


# (dim, window, heads, batch, height, width): windows of 1,024 and 784 queries, where torch's CPU flash kernel
# works in larger query blocks, and of 64 and 256; sizes that are not multiples of the window are reflect-padded and cropped.
CASES = [(16, 32, 2, 1, 64, 64), (16, 32, 2, 2, 40, 70), (12, 28, 3, 1, 30, 29), (32, 8, 2, 3, 21, 35),
         (16, 16, 4, 1, 5, 3)]


@pytest.mark.parametrize("case", CASES, ids=[f"dim{c[0]}-ws{c[1]}-h{c[2]}-b{c[3]}-{c[4]}x{c[5]}" for c in CASES])
def test_cpu_sdpa_layout_matches_naive_in_inference(case) -> None:
    dim, window, heads, batch, height, width = case
    sdpa, naive = (m.eval() for m in _pair(dim, window, heads))
    layout = _layout(sdpa)
    x = torch.randn(batch, dim, height, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = naive(x)
        plain = sdpa(x)
        out = layout(sdpa, x)
        sdpa.bake()
        baked = layout(sdpa, x)
    # dense either way: NCHW, or channels-last where CPU inference runs on oneDNN (esc_runtime.onednn)
    assert out.shape == expected.shape == x.shape
    assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 2e-6 * scale
    assert (plain - expected).abs().max().item() <= 2e-6 * scale
    assert torch.equal(baked, out)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["window-multiple", "cropped"])
def test_cpu_sdpa_layout_fuses_the_norm_and_the_residual(case) -> None:
    """``layout(layer, x, norm=ln, add=x)`` is the block's ``x + attn(ln(x))`` (a window multiple adds the residual
    inside the output projection; a cropped map after it)."""
    dim, window, heads, batch, height, width = case
    sdpa, naive = (m.eval() for m in _pair(dim, window, heads))
    norm = LayerNorm2d(dim).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(batch, dim, height, width, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = x + naive(norm(x))
        out = _layout(sdpa)(sdpa, x, norm=norm, add=x)
    assert out.shape == x.shape
    assert (out - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["large-window", "small-window"])
def test_the_plain_sdpa_module_trains_like_naive(case) -> None:
    """Training uses the plain model (a prepared one is for inference only): its sdpa module's gradients are naive's."""
    dim, window, heads, batch, height, width = case
    sdpa, naive = (m.train() for m in _pair(dim, window, heads))
    x = torch.randn(batch, dim, height, width, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for module in (naive, sdpa):
        xi = x.clone().requires_grad_()
        (module(xi) * grad_out).sum().backward()
        grads.append({"input": xi.grad, **{name: p.grad for name, p in module.named_parameters()}})
    for name, expected in grads[0].items():
        assert (grads[1][name] - expected).abs().max().item() <= 1e-5 * expected.abs().max().item(), name


def test_bias_gather_is_the_table_indexed_by_relative_position() -> None:
    layer = WindowAttention(16, 8, 2)
    table = layer.relative_position_bias
    assert torch.equal(layer.attention_bias(torch.float32), table[:, relative_position_index(8)])
