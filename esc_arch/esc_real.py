"""Real-world ESC models: ESC-Real (x4) and ESCRealM (any head, x1-x4)."""

from __future__ import annotations

import torch
from torch import nn

from .base import SharedKernelTrunk
from .blocks import make_blocks, shared_large_kernel
from .layers import ReflectConv2d, pad_to_multiple
from .upsamplers import DySample, UniUpsample, esc_real_nearest_conv_head, neosr_nearest_conv_head

ESC_REAL_HEADS = ("nearest+conv", "dysample", "nearest+conv-neosr")


def _input_skip(dim: int, unshuffle: int = 1) -> nn.Sequential:
    """Side branch from the input image into the features: 1x1 -> 7x7 depthwise (reflect) -> LReLU -> 1x1."""
    layers: list[nn.Module] = [nn.PixelUnshuffle(unshuffle)] if unshuffle > 1 else []
    layers += [
        nn.Conv2d(3 * unshuffle * unshuffle, dim * 2, 1),
        ReflectConv2d(dim * 2, dim * 2, 7, padding=3, groups=dim * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim * 2, dim, 1),
    ]
    return nn.Sequential(*layers)


class _RealTrunk(SharedKernelTrunk):
    """The ESC-Real trunk: features = last(blocks(proj(x))) + proj(x) + skip(x), then the ``to_img`` head."""

    def _init_trunk(self, *, dim, pdim, n_blocks, conv_blocks, window_size, num_heads, exp_ratio, attn_type):
        self.blocks = make_blocks(
            n_blocks=n_blocks, dim=dim, pdim=pdim, conv_blocks=conv_blocks, window_size=window_size,
            num_heads=num_heads, exp_ratio=exp_ratio, use_ln=True, attn_type=attn_type,
        )
        self.last = nn.Conv2d(dim, dim, 3, padding=1)

    #: The trunk runs on pixel-unshuffled input by this factor (ESCRealM below x3 sets it per instance).
    unshuffle: int = 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        return self.last(self.run_blocks(feat)) + feat + self.skip(x)


class ESCReal(_RealTrunk):
    """ESC-Real: the ESC trunk (LayerNorm before every conv-stage FFN) with an input skip branch and
    no image residual.

    ``upsampler``: 'nearest+conv' (official; a fixed x4 whatever ``upscaling_factor`` says),
    'dysample' (official ``use_dysample=True``), or 'nearest+conv-neosr' (neosr's layout).
    ``use_dysample`` is accepted for upstream option files and overrides ``upsampler``.
    """

    arch_name = "ESCReal"

    def __init__(
        self,
        *,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 10,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 2.0,
        upsampler: str = "nearest+conv",
        attn_type: str = "sdpa",
        use_dysample: bool | None = None,
    ) -> None:
        super().__init__()
        if use_dysample is not None:
            upsampler = "dysample" if use_dysample else ("nearest+conv" if upsampler == "dysample" else upsampler)
        if upsampler not in ESC_REAL_HEADS:
            raise ValueError(f"unknown ESCReal upsampler {upsampler!r}; choose one of {', '.join(ESC_REAL_HEADS)}")
        if upsampler == "nearest+conv" and upscaling_factor != 4:
            raise ValueError("the official ESC-Real nearest+conv head is a fixed x4; use 'dysample' or 'nearest+conv-neosr'")
        arguments = dict(locals())
        arguments.pop("use_dysample")
        arguments["upsampler"] = upsampler
        self._record(arguments)
        self.scale = upscaling_factor
        self.window_size = window_size
        self.plk_filter = shared_large_kernel(pdim, kernel_size)
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self._init_trunk(
            dim=dim, pdim=pdim, n_blocks=n_blocks, conv_blocks=conv_blocks,
            window_size=window_size, num_heads=num_heads, exp_ratio=exp_ratio, attn_type=attn_type,
        )
        if upsampler == "dysample":
            self.to_img = DySample(dim, 3, upscaling_factor, groups=4)
        elif upsampler == "nearest+conv":
            self.to_img = esc_real_nearest_conv_head(dim)
        else:
            self.to_img = neosr_nearest_conv_head(dim, upscaling_factor)
        self.skip = _input_skip(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_img(self.features(x))


class ESCRealM(_RealTrunk):
    """ESCRealM: ESC-Real with a selectable upsampler (``UniUpsample``) and any scale from x1.

    With ``unshuffle_mod`` and a scale below 3, the input is reflect-padded to a multiple of
    4 // scale and pixel-unshuffled, the trunk runs at that lower resolution, and an x4 head brings
    it to the target size (then cropped).  The 'conv' head never upsamples (upstream behaviour):
    such a model's output is 1/unshuffle of the input size.
    """

    arch_name = "ESCRealM"

    def __init__(
        self,
        *,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 10,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 2.0,
        mid_dim: int = 48,
        upsampler: str = "nearest+conv",
        unshuffle_mod: bool = True,
        attn_type: str = "sdpa",
    ) -> None:
        super().__init__()
        self._record(locals())
        self.window_size = window_size
        self.unshuffle = 4 // upscaling_factor if unshuffle_mod and upscaling_factor < 3 else 1
        head_scale = 4 if self.unshuffle > 1 else upscaling_factor
        if upsampler == "conv":
            self.scale = 1 / self.unshuffle if self.unshuffle > 1 else 1
        else:
            self.scale = upscaling_factor
        self.plk_filter = shared_large_kernel(pdim, kernel_size)
        if self.unshuffle > 1:
            self.proj = nn.Sequential(nn.PixelUnshuffle(self.unshuffle), nn.Conv2d(3 * self.unshuffle**2, dim, 3, padding=1))
        else:
            self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.skip = _input_skip(dim, self.unshuffle)
        self._init_trunk(
            dim=dim, pdim=pdim, n_blocks=n_blocks, conv_blocks=conv_blocks,
            window_size=window_size, num_heads=num_heads, exp_ratio=exp_ratio, attn_type=attn_type,
        )
        self.to_img = UniUpsample(upsampler, head_scale, dim, 3, mid_dim, 4)

    def adapt_state_dict(self, state_dict):
        # Upstream keeps its own MetaUpsample whatever the checkpoint says (traiNNer's v3 included).
        if "to_img.MetaUpsample" in state_dict:
            state_dict["to_img.MetaUpsample"] = self.to_img.MetaUpsample.clone()
        return state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = pad_to_multiple(x, self.unshuffle)
        out = self.to_img(self.features(x))
        if self.scale < 1:  # the 'conv' head after unshuffling: nothing to crop
            return out
        return out[:, :, : h * self.scale, : w * self.scale]  # integer arithmetic stays symbolic in exports
