"""The forward passes of the ESC models as the runtime runs them: each layer through its chosen implementation, and
every stage through a :class:`~esc_runtime.streaming.MapRunner` (whole, or layer-streamed over tiles).

They compute what the plain models' ``forward`` methods compute (the contract tests hold them to it on every
golden case); the difference is how: norms and residuals handed to the implementations that fuse them, the shared
large kernel prepared once per pass, and each stage's context radius stated so that it can run tile by tile.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esc_arch import ESC, ESCFP, ESCLTE, ESCReal, ESCRealM
from esc_arch.blocks import ESCBlock
from esc_arch.layers import pad_to_multiple

from . import onednn
from .dispatch import Choice
from .streaming import MapRunner

#: LR pixels of context the real-world upsampling heads get when streamed: the conv heads need at most 3,
#: DySample's learned sampling offsets were measured below 1 pixel on the golden checkpoints; 8 leaves a margin.
REAL_HEAD_RADIUS = 8


class Plan:
    """The implementations a prepared model runs, one per kind of layer (every block of a model has the same
    shapes, so one choice serves all)."""

    def __init__(self, choices: dict[str, Choice]) -> None:
        self.choices = choices
        self.attention = choices["window attention"].implementation
        self.ffn = choices["ConvFFN"].implementation
        self.partial_conv = choices["partial convolution"].implementation
        self.convolution = choices["closing convolution"].implementation

    def describe(self) -> list[str]:
        """One line per kind of layer: the implementation chosen, and why each one before it was not."""
        return [choice.describe() for choice in self.choices.values()]


def _norm(ln: nn.Module) -> nn.Module | None:
    return None if isinstance(ln, nn.Identity) else ln


def _kernel_radius(kernel) -> int:
    spatial = kernel[-1] if isinstance(kernel, tuple) else kernel
    return spatial.shape[-1] // 2


def run_block(block: ESCBlock, plan: Plan, x: torch.Tensor, kernel, prepared, maps: MapRunner) -> torch.Tensor:
    """:meth:`esc_arch.blocks.ESCBlock.forward`, stage by stage (radii: each stage's context in pixels)."""
    x = onednn.channels_last(x)  # on the oneDNN path the maps stay channels-last from here on
    skip = x
    x = maps.local(lambda t: plan.ffn(block.proj, t, norm=block.ln_proj), x, radius=1)  # no residual (upstream)
    # Window attention is window-local: no context on tiles aligned to the window grid; it may overwrite x.
    x = maps.local(lambda t: plan.attention(block.attn, t, norm=block.ln_attn, add=t), x, radius=0, into=0)
    radius = _kernel_radius(kernel)
    for ln, ffn, pconv in zip(block.lns, block.convffns, block.pconvs):
        y = maps.local(lambda t, ffn=ffn, ln=ln: plan.ffn(ffn, t, norm=_norm(ln)), x, radius=1)
        # The dynamic kernel comes from the whole map's average, also when the stage runs tile by tile.
        dynamic = pconv.plk.dynamic_kernel(_global_mean(maps, y[:, : pconv.plk.pdim]))
        x = maps.local(lambda t, u, pconv=pconv, dynamic=dynamic: plan.partial_conv(pconv, u, kernel=prepared,
                                                                                   dynamic=dynamic, add=t),
                       x, y, radius=radius, into=0)  # x only as the residual: its output may overwrite it
        del y
    return maps.local(lambda t, s: plan.convolution(block.conv_out, t, norm=block.ln_out, add=s), x, skip, radius=1)


def _global_mean(maps: MapRunner, x: torch.Tensor) -> torch.Tensor:
    mean = maps.mean(x)
    return x if mean is None else mean  # whole maps: the dynamic kernel's own pooling averages


def run_trunk(model: nn.Module, plan: Plan, feat: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    kernel = model.large_kernel()
    prepared = plan.partial_conv.prepare_kernel(kernel, feat) if not isinstance(kernel, tuple) else kernel
    for block in model.blocks:
        feat = run_block(block, plan, feat, kernel, prepared, maps)
    return feat


def esc(model: ESC, plan: Plan, x: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    feat = maps.local(model.proj, x, radius=1)
    body = run_trunk(model, plan, feat, maps)

    def head(body: torch.Tensor, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(model.to_img(model.last(body) + feat), model.scale)
        return out + F.interpolate(x, scale_factor=model.scale, mode="nearest")

    return maps.local(head, body, feat, x, radius=2)


def esc_fp(model: ESCFP, plan: Plan, x: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    feat = maps.local(model.proj, x, radius=1)
    body = run_trunk(model, plan, feat, maps)

    def head(body: torch.Tensor, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        feat = model.last(model.ln_last(body)) + skip
        residual = F.interpolate(x, scale_factor=model.scale, mode="bicubic", align_corners=False)
        return F.pixel_shuffle(model.to_img(feat), model.scale) + residual

    return maps.local(head, body, feat, x, radius=2)  # two 3x3 convs; bicubic taps reach 2 LR pixels


def _real_features(model: ESCReal | ESCRealM, plan: Plan, x: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    unshuffle = model.unshuffle  # radii are in pixels of x, the trunk's input
    feat = maps.local(model.proj, x, radius=unshuffle)
    body = run_trunk(model, plan, feat, maps)
    skip = maps.local(model.skip, x, radius=3 * unshuffle)  # the 7x7 depthwise conv
    return maps.local(lambda body, feat, skip: model.last(body) + feat + skip, body, feat, skip, radius=1)


def esc_real(model: ESCReal, plan: Plan, x: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    return maps.local(model.to_img, _real_features(model, plan, x, maps), radius=REAL_HEAD_RADIUS)


def esc_realm(model: ESCRealM, plan: Plan, x: torch.Tensor, maps: MapRunner) -> torch.Tensor:
    h, w = x.shape[-2:]
    if model.unshuffle > 1:
        x = pad_to_multiple(x, model.unshuffle)
    out = maps.local(model.to_img, _real_features(model, plan, x, maps), radius=REAL_HEAD_RADIUS)
    if model.scale < 1:  # the 'conv' head after unshuffling: nothing to crop
        return out
    return out[:, :, : h * model.scale, : w * model.scale]


def lte_encode_maps(model: ESCLTE, plan: Plan, lr: torch.Tensor, maps: MapRunner) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`esc_arch.ESCLTE.encode_maps`: the encoder, then the coefficient and frequency maps."""
    encoder = model.encoder
    feat = maps.local(encoder.proj, lr, radius=1)
    body = run_trunk(encoder, plan, feat, maps)
    feat = maps.local(lambda body, feat: encoder.last(body) + feat, body, feat, radius=1)
    return maps.local(model.coef, feat, radius=1), maps.local(model.freq, feat, radius=1)


#: The forward pass of each architecture (the arbitrary-scale model's is its encoder's).
FORWARDS: dict[type, Callable[..., torch.Tensor]] = {
    ESC: esc, ESCFP: esc_fp, ESCReal: esc_real, ESCRealM: esc_realm,
}
