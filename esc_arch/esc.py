"""ESC, the classic super-resolution model (base, light and XL presets), and ESC-FP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ESCModelBase, SharedKernelTrunk
from .blocks import DecomposedConvolutionalAttention, make_blocks, shared_large_kernel
from .layers import LayerNorm2d


def resize_subpixel_head(weight: torch.Tensor, bias: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a pixel-shuffle head (3*s^2 output channels) to another scale, as upstream does when
    an x2 checkpoint initialises an x3/x4 model: each colour's s x s sub-pixel grid is resized
    bilinearly (align_corners=False)."""
    out_ch, in_ch, kh, kw = weight.shape
    src = int(round((out_ch / 3) ** 0.5))
    grid = weight.reshape(3, src, src, in_ch * kh * kw).permute(3, 0, 1, 2)
    grid = F.interpolate(grid, size=(scale, scale), mode="bilinear", align_corners=False)
    new_weight = grid.permute(1, 2, 3, 0).reshape(3 * scale * scale, in_ch, kh, kw)
    new_bias = F.interpolate(bias.reshape(1, 3, src, src), size=(scale, scale), mode="bilinear", align_corners=False)
    return new_weight.contiguous(), new_bias.flatten()


class _PixelShuffleHeadMixin:
    """Load checkpoints of another scale into a pixel-shuffle head by resizing ``to_img``."""

    def adapt_state_dict(self, state_dict):
        weight = state_dict.get("to_img.weight")
        expected = 3 * self.scale * self.scale
        if weight is not None and weight.ndim == 4 and weight.shape[0] != expected and weight.shape[0] % 3 == 0:
            state_dict["to_img.weight"], state_dict["to_img.bias"] = resize_subpixel_head(
                weight, state_dict["to_img.bias"], self.scale
            )
        return state_dict


class ESC(_PixelShuffleHeadMixin, SharedKernelTrunk):
    """ESC: window attention plus stacks of large-kernel convolutional attention.

    Output = pixel_shuffle(to_img(features)) + nearest-neighbour upsampling of the input.
    The defaults are the paper's base model; ``esc_light`` uses 3 blocks, ``esc_xl`` is
    dim 192 / pdim 48 / 8 blocks / window 48 / 12 heads with ``use_ln``.
    """

    arch_name = "ESC"

    def __init__(
        self,
        *,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 1.25,
        use_ln: bool = False,
        attn_type: str = "sdpa",
    ) -> None:
        super().__init__()
        self._record(locals())
        self.scale = upscaling_factor
        self.window_size = window_size
        self.plk_filter = shared_large_kernel(pdim, kernel_size)
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = make_blocks(
            n_blocks=n_blocks, dim=dim, pdim=pdim, conv_blocks=conv_blocks, window_size=window_size,
            num_heads=num_heads, exp_ratio=exp_ratio, use_ln=use_ln, attn_type=attn_type,
        )
        self.last = nn.Conv2d(dim, dim, 3, padding=1)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        feat = self.last(self.run_blocks(feat)) + feat
        out = F.pixel_shuffle(self.to_img(feat), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


class ESCFP(_PixelShuffleHeadMixin, ESCModelBase):
    """ESC-FP: a decomposed large kernel (1x1 channel mix + depthwise spatial kernel), LayerNorm
    before every conv-stage FFN and the last conv, and a bicubic image residual."""

    arch_name = "ESCFP"

    def __init__(
        self,
        *,
        dim: int = 48,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 3,
        upscaling_factor: int = 4,
        exp_ratio: float = 1.25,
        attn_type: str = "sdpa",
    ) -> None:
        super().__init__()
        self._record(locals())
        self.scale = upscaling_factor
        self.window_size = window_size
        self.lk_channel = nn.Parameter(torch.randn(pdim, pdim, 1, 1))
        self.lk_spatial = nn.Parameter(torch.empty(pdim, 1, kernel_size, kernel_size))
        nn.init.orthogonal_(self.lk_spatial)
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = make_blocks(
            n_blocks=n_blocks, dim=dim, pdim=pdim, conv_blocks=conv_blocks, window_size=window_size,
            num_heads=num_heads, exp_ratio=exp_ratio, use_ln=True, attn_type=attn_type,
            proj_ratio=1.5, conv_attention=DecomposedConvolutionalAttention,
        )
        self.ln_last = LayerNorm2d(dim)
        self.last = nn.Conv2d(dim, dim, 3, padding=1)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)

    def large_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decomposed large kernel: a 1x1 channel mix and a depthwise spatial kernel (no ensemble, no bake)."""
        return self.lk_channel, self.lk_spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        feat = self.last(self.ln_last(self.run_blocks(feat))) + feat
        residual = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return F.pixel_shuffle(self.to_img(feat), self.scale) + residual
