"""The CPU sdpa path of ``WindowAttention`` (its own layout, GEMM projections) computes what the naive reference
computes: outputs and gradients, odd sizes, batches, large and small windows."""

from __future__ import annotations

import pytest
import torch

from esc_arch.attention import WindowAttention, relative_position_index


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
    x = torch.randn(batch, dim, height, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = naive(x)
        out = sdpa(x)
        sdpa.bake()
        baked = sdpa(x)
    # dense either way: NCHW, or channels-last where CPU inference runs on oneDNN (esc_runtime.onednn)
    assert out.shape == expected.shape == x.shape
    assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 2e-6 * scale
    assert torch.equal(baked, out)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["large-window", "small-window"])
def test_cpu_sdpa_layout_trains_like_naive(case) -> None:
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
