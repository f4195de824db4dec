"""Upsampling heads of the real-world ESC models: ESC-Real's fixed nearest+conv head, neosr's
variant of it, DySample, and the multi-method ``UniUpsample`` of ESCRealM (official v2 and
traiNNer-redux's v3, which adds ``transpose+conv``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Method order of the MetaUpsample buffer: official UniUpsample (version 2) and traiNNer-redux's
# UniUpsampleV3 (version 3).  Only the methods listed here are implemented.
UNIUPSAMPLE_METHODS_V2 = ("conv", "pixelshuffledirect", "pixelshuffle", "nearest+conv", "dysample")
UNIUPSAMPLE_METHODS_V3 = UNIUPSAMPLE_METHODS_V2 + ("transpose+conv", "lda", "pa_up")
UPSAMPLERS = UNIUPSAMPLE_METHODS_V2 + ("transpose+conv",)


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def _power_of_two_steps(scale: int, method: str) -> int:
    steps = int(math.log2(scale)) if scale > 0 else -1
    if 2**steps != scale:
        raise ValueError(f"the {method!r} upsampler supports scales 1, 2, 4, 8 ... (and 3 where noted), not {scale}")
    return steps


class DySample(nn.Module):
    """Dynamic point-sampling upsampler (Liu et al., 2023): learned sub-pixel offsets around a
    regular grid, sampled bilinearly from ``groups`` channel groups, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, scale: int, groups: int = 4, end_convolution: bool = True) -> None:
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"DySample needs in_channels ({in_channels}) divisible by groups ({groups})")
        self.scale = scale
        self.groups = groups
        offsets = 2 * groups * scale * scale
        self.offset = nn.Conv2d(in_channels, offsets, 1)
        self.scope = nn.Conv2d(in_channels, offsets, 1, bias=False)
        nn.init.trunc_normal_(self.offset.weight, std=0.02)
        nn.init.zeros_(self.offset.bias)
        nn.init.zeros_(self.scope.weight)
        self.end_conv = nn.Conv2d(in_channels, out_channels, 1) if end_convolution else None
        steps = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).transpose(1, 2)
        self.register_buffer("init_pos", grid.repeat(1, groups, 1).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s, g = self.scale, self.groups
        # Sampling positions are computed and used in fp32: in fp16 they lose sub-pixel precision
        # on large images, and torch's CPU half grid_sample can return NaN.
        offset = (self.offset(x) * self.scope(x).sigmoid() * 0.5 + self.init_pos).float()
        offset = offset.view(b, 2, g * s * s, h, w)
        ys = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
        base = torch.stack(torch.meshgrid(xs, ys, indexing="ij")).transpose(1, 2).view(1, 2, 1, h, w)
        size = torch.stack([xs[-1] + 0.5, ys[-1] + 0.5]).view(1, 2, 1, 1, 1)  # (w, h), traced from shapes
        coords = 2 * (base + offset) / size - 1
        coords = F.pixel_shuffle(coords.reshape(b, -1, h, w), s).view(b, 2, g, s * h, s * w)
        coords = coords.permute(0, 2, 3, 4, 1).reshape(b * g, s * h, s * w, 2)
        source = x.float().reshape(b * g, c // g, h, w).contiguous()
        out = F.grid_sample(source, coords, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.view(b, c, s * h, s * w).to(x.dtype)
        return self.end_conv(out) if self.end_conv is not None else out


def esc_real_nearest_conv_head(dim: int, out_channels: int = 3) -> nn.Sequential:
    """Official ESC-Real head, a fixed x4: (nearest x2 -> conv -> LReLU) x2 -> conv -> LReLU -> conv."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), _conv3(dim, dim), nn.LeakyReLU(0.2, inplace=True),
        nn.Upsample(scale_factor=2, mode="nearest"), _conv3(dim, dim), nn.LeakyReLU(0.2, inplace=True),
        _conv3(dim, dim), nn.LeakyReLU(0.2, inplace=True),
        _conv3(dim, out_channels),
    )


def neosr_nearest_conv_head(dim: int, scale: int, out_channels: int = 3) -> nn.Sequential:
    """neosr's ESC real-world head: per x2 step (nearest x2 -> conv -> LReLU -> conv -> LReLU), then conv."""
    layers: list[nn.Module] = []
    for _ in range(_power_of_two_steps(scale, "nearest+conv-neosr")):
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv3(dim, dim), nn.LeakyReLU(0.2, inplace=True),
            _conv3(dim, dim), nn.LeakyReLU(0.2, inplace=True),
        ]
    layers.append(_conv3(dim, out_channels))
    return nn.Sequential(*layers)


class UniUpsample(nn.Sequential):
    """ESCRealM's selectable upsampler, with its ``MetaUpsample`` buffer
    ``[version, method index, scale, in_dim, out_dim, mid_dim, group]``.

    ``conv`` keeps the resolution (as upstream does, whatever the scale).  ``transpose+conv`` is
    traiNNer-redux's default and is stored as version 3; the rest as the official version 2.
    """

    def __init__(self, method: str, scale: int, in_dim: int, out_dim: int = 3, mid_dim: int = 64, group: int = 4) -> None:
        if method not in UPSAMPLERS:
            raise ValueError(f"unknown upsampler {method!r}; choose one of {', '.join(UPSAMPLERS)}")
        version = 3 if method not in UNIUPSAMPLE_METHODS_V2 else 2
        methods = UNIUPSAMPLE_METHODS_V3 if version == 3 else UNIUPSAMPLE_METHODS_V2
        super().__init__(*self._layers(method, scale, in_dim, out_dim, mid_dim, group))
        meta = [version, methods.index(method), scale, in_dim, out_dim, mid_dim, group]
        self.register_buffer("MetaUpsample", torch.tensor(meta, dtype=torch.uint8))

    @staticmethod
    def _layers(method: str, scale: int, in_dim: int, out_dim: int, mid_dim: int, group: int) -> list[nn.Module]:
        if method == "conv" or scale == 1:
            return [_conv3(in_dim, out_dim)]
        if method == "pixelshuffledirect":
            return [_conv3(in_dim, out_dim * scale * scale), nn.PixelShuffle(scale)]
        if method == "pixelshuffle":
            layers: list[nn.Module] = [_conv3(in_dim, mid_dim), nn.LeakyReLU(0.01, inplace=True)]
            if scale == 3:
                layers += [_conv3(mid_dim, 9 * mid_dim), nn.PixelShuffle(3)]
            else:
                for _ in range(_power_of_two_steps(scale, method)):
                    layers += [_conv3(mid_dim, 4 * mid_dim), nn.PixelShuffle(2)]
            return layers + [_conv3(mid_dim, out_dim)]
        if method == "nearest+conv":
            if scale == 3:
                layers = [_conv3(in_dim, in_dim), nn.Upsample(scale_factor=3), nn.LeakyReLU(0.2, inplace=True)]
            else:
                layers = []
                for _ in range(_power_of_two_steps(scale, method)):
                    layers += [_conv3(in_dim, in_dim), nn.Upsample(scale_factor=2), nn.LeakyReLU(0.2, inplace=True)]
            return layers + [_conv3(in_dim, in_dim), nn.LeakyReLU(0.2, inplace=True), _conv3(in_dim, out_dim)]
        if method == "dysample":
            layers = []
            if mid_dim != in_dim:
                layers += [_conv3(in_dim, mid_dim), nn.LeakyReLU(0.01, inplace=True)]
            return layers + [DySample(mid_dim, out_dim, scale, group)]
        # transpose+conv: strided 4x4 transposed convs (x2 each), GELU between, then a 3x3 conv.
        steps = _power_of_two_steps(scale, method)
        layers = []
        for _ in range(steps - 1):
            layers += [nn.ConvTranspose2d(in_dim, in_dim, 4, 2, 1), nn.GELU()]
        return layers + [nn.ConvTranspose2d(in_dim, out_dim, 4, 2, 1), _conv3(out_dim, out_dim)]
