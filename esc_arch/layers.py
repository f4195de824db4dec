"""Small building blocks shared by every ESC variant.

Everything here is plain PyTorch; the state-dict names of the modules follow the official
implementation (dslisleedh/ESC) so that its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "LayerNorm2d",
    "ConvFFN",
    "pad_reflect",
    "ReflectConv2d",
    "pad_to_multiple",
    "geometric_ensemble",
    "per_sample_depthwise_conv",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (ESC's ``channels_first`` LayerNorm, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """1x1 expand -> GELU -> 3x3 depthwise (+ residual inside) -> GELU -> 1x1 project."""

    def __init__(self, dim: int, kernel_size: int = 3, exp_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = int(dim * exp_ratio)
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.aggr = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.proj(x))
        x = x + F.gelu(self.dwc(x))
        return self.aggr(x)


def pad_reflect(x: torch.Tensor, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0) -> torch.Tensor:
    """Reflect-pad the last two axes of ``x`` by any amount, down to a 1-pixel input.

    ``F.pad(mode='reflect')`` needs each pad to be smaller than the side it reflects, which is why
    upstream ESC crashes on inputs of at most window/2 pixels.  Here a pad that is too large is
    applied as repeated reflections (the mirrored image is mirrored again), and a side of a single
    pixel, which has nothing to reflect, is replicated.  Whenever one reflection suffices the
    result is exactly upstream's.
    """
    pads = [left, right, top, bottom]
    while any(pads):
        w, h = x.shape[-1], x.shape[-2]
        step = [min(pads[0], w - 1), min(pads[1], w - 1), min(pads[2], h - 1), min(pads[3], h - 1)]
        if not any(step):
            return F.pad(x, tuple(pads), mode="replicate")
        x = F.pad(x, tuple(step), mode="reflect")
        pads = [p - s for p, s in zip(pads, step)]
    return x


class ReflectConv2d(nn.Conv2d):
    """``nn.Conv2d(padding_mode='reflect')`` that also accepts inputs smaller than its padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding  # type: ignore[misc]
        x = pad_reflect(x, left=pw, right=pw, top=ph, bottom=ph)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the right/bottom of an NCHW tensor so both sides are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return pad_reflect(x, right=(multiple - w % multiple) % multiple, bottom=(multiple - h % multiple) % multiple)


def geometric_ensemble(kernel: torch.Tensor) -> torch.Tensor:
    """Average a conv kernel over the 8 flips/rotations of the square (IGConv's re-parameterisation).

    ESC checkpoints store the raw kernel; the model always convolves with this average, which
    makes the large kernel invariant to flips, 90 degree rotations and transposes.
    """
    rotated = torch.rot90(kernel, -1, dims=(2, 3))
    total = kernel.new_zeros(kernel.shape)
    for k in (kernel, rotated):
        total = total + k + k.flip(3) + k.flip(2) + k.flip(2, 3)
    return total / 8


def per_sample_depthwise_conv(x: torch.Tensor, kernels: torch.Tensor, padding: int) -> torch.Tensor:
    """Depthwise conv of each sample with its own kernels: x (B, C, H, W), kernels (B, C, k, k).

    The batch is folded into the channel axis so one grouped convolution serves any batch size
    (upstream's eval path only handled batch 1).
    """
    b, c, h, w = x.shape
    weight = kernels.reshape(b * c, 1, *kernels.shape[-2:])
    out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=padding, groups=b * c)
    return out.view(b, c, h, w)
