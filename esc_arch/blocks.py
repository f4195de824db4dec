"""ESC's convolutional attention (a shared large kernel plus a per-sample dynamic 3x3 kernel) and
the residual block that combines it with window attention."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esc_runtime import native, onednn, spectral
from .attention import WindowAttention
from .layers import ConvFFN, LayerNorm2d, per_sample_depthwise_conv
from esc_runtime.streaming import WHOLE, MapRunner

#: The large kernel prepared for a forward pass (by orbit for the native correlation, or with its FFT spectrum): each
#: has ``.kernel`` and ``.correlate(x, dynamic, out=...)``.
PREPARED_KERNELS = (native.SymmetricKernel, spectral.SpectralKernel)


def _dynamic_kernel_mlp(pdim: int, hidden: int) -> nn.Sequential:
    """Global-pool -> 1x1 -> GELU -> 1x1 predicting a 3x3 depthwise kernel per channel and sample."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(pdim, hidden, 1),
        nn.GELU(),
        nn.Conv2d(hidden, pdim * 9, 1),
    )


class ConvolutionalAttention(nn.Module):
    """ESC's partial convolution: the first ``pdim`` channels get the shared large kernel (a dense
    pdim->pdim conv, passed in) plus their own dynamic 3x3 depthwise kernel; the rest pass through."""

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.dwc_proj = _dynamic_kernel_mlp(pdim, pdim // 2)
        # Zero init: the dynamic kernel starts at 0 (upstream).
        nn.init.zeros_(self.dwc_proj[-1].weight)
        nn.init.zeros_(self.dwc_proj[-1].bias)

    def dynamic_kernel(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's ``(b, pdim, 3, 3)`` depthwise kernel, predicted from the global average of ``x[:, :pdim]``
        (``pooled`` where ``x`` is a tile)."""
        return self.dwc_proj(x[:, : self.pdim] if pooled is None else pooled).view(x.shape[0], self.pdim, 3, 3)

    def forward(
        self, x: torch.Tensor, large_kernel, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``pooled``: the global average of ``x[:, :pdim]`` when ``x`` is a tile (the pool of a 1x1 map is itself);
        ``large_kernel``: the shared kernel, or one of :data:`PREPARED_KERNELS`."""
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        dynamic = self.dynamic_kernel(x, pooled)
        if isinstance(large_kernel, PREPARED_KERNELS):  # both kernels in one pass, written beside x2: no cat
            out = torch.empty_like(x)
            large_kernel.correlate(x1, dynamic, out=out[:, : self.pdim])
            out[:, self.pdim :] = x2
            return out
        k = large_kernel.shape[-1]
        x1 = F.conv2d(x1, large_kernel, padding=k // 2) + per_sample_depthwise_conv(x1, dynamic, padding=1)
        return torch.cat([x1, x2], dim=1)


class DecomposedConvolutionalAttention(nn.Module):
    """ESC-FP's partial convolution: a 1x1 channel mix, then a depthwise large kernel to which the
    per-sample dynamic 3x3 kernel is added (zero-padded to the large kernel's size)."""

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.proj = _dynamic_kernel_mlp(pdim, pdim // 4)

    def forward(
        self, x: torch.Tensor, large_kernel: tuple[torch.Tensor, torch.Tensor], pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        lk_channel, lk_spatial = large_kernel
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        b = x1.shape[0]
        k = lk_spatial.shape[-1]
        dynamic = self.proj(x1 if pooled is None else pooled).view(b, self.pdim, 3, 3)
        pad = (k - 3) // 2
        kernels = F.pad(dynamic, (pad, pad, pad, pad)) + lk_spatial.view(1, self.pdim, k, k)
        x1 = per_sample_depthwise_conv(F.conv2d(x1, lk_channel), kernels, padding=k // 2)
        return torch.cat([x1, x2], dim=1)


class ConvAttentionWrapper(nn.Module):
    """Partial convolutional attention followed by a 1x1 channel mix (``plk`` then ``aggr``), plus ``add``."""

    def __init__(self, dim: int, plk: nn.Module) -> None:
        super().__init__()
        self.plk = plk
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(
        self, x: torch.Tensor, large_kernel, pooled: torch.Tensor | None = None, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(large_kernel, native.SymmetricKernel) and isinstance(self.plk, ConvolutionalAttention) \
                and self.aggr.in_channels % 16 == 0:  # one native pass: the partial convolution never written out
            return large_kernel.partial_conv_attention(x, self.plk.dynamic_kernel(x, pooled), self.aggr, add)
        return onednn.conv(self.aggr, self.plk(x, large_kernel, pooled), add=add)


def large_kernel_radius(large_kernel) -> int:
    """Pixels of context the partial convolution needs: half the large kernel (the dynamic 3x3 needs less)."""
    if isinstance(large_kernel, PREPARED_KERNELS):
        large_kernel = large_kernel.kernel
    spatial = large_kernel[-1] if isinstance(large_kernel, tuple) else large_kernel
    return spatial.shape[-1] // 2


class ESCBlock(nn.Module):
    """FFN -> window attention -> ``conv_blocks`` x (FFN + convolutional attention) -> 3x3 conv,
    with a residual over the whole block.

    ``conv_attention`` builds one partial conv module (ESC's or ESC-FP's); ``use_ln`` adds a
    LayerNorm before each FFN of the conv stage (ESC-XL, ESC-FP, ESC-Real).
    """

    def __init__(
        self,
        *,
        dim: int,
        pdim: int,
        conv_blocks: int,
        window_size: int,
        num_heads: int,
        exp_ratio: float,
        proj_ratio: float,
        use_ln: bool,
        attn_type: str,
        conv_attention: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.ln_proj = LayerNorm2d(dim)
        self.proj = ConvFFN(dim, 3, proj_ratio)
        self.ln_attn = LayerNorm2d(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_type)
        self.lns = nn.ModuleList([LayerNorm2d(dim) if use_ln else nn.Identity() for _ in range(conv_blocks)])
        self.pconvs = nn.ModuleList([ConvAttentionWrapper(dim, conv_attention(pdim)) for _ in range(conv_blocks)])
        self.convffns = nn.ModuleList([ConvFFN(dim, 3, exp_ratio) for _ in range(conv_blocks)])
        self.ln_out = LayerNorm2d(dim)
        self.conv_out = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, large_kernel, maps: MapRunner = WHOLE) -> torch.Tensor:
        """``maps`` runs the stages (see :mod:`esc_runtime.streaming`); the radii are each stage's context in pixels."""
        x = onednn.channels_last(x)  # CPU inference: the maps stay channels-last from here on
        skip = x
        x = maps.local(lambda t: self.proj(t, norm=self.ln_proj), x, radius=1)  # no residual around it (upstream)
        # Window attention is window-local: no context on tiles aligned to the window grid; it may overwrite x.
        x = maps.local(lambda t: self.attn(t, add=t, norm=self.ln_attn), x, radius=0, into=0)
        radius = large_kernel_radius(large_kernel)
        for ln, pconv, ffn in zip(self.lns, self.pconvs, self.convffns):
            y = maps.local(lambda t, ln=ln, ffn=ffn: ffn(t, norm=None if isinstance(ln, nn.Identity) else ln), x,
                           radius=1)
            pooled = maps.mean(y[:, : pconv.plk.pdim])  # the dynamic kernel's global pool: whole-map, not per tile
            x = maps.local(lambda t, u, pconv=pconv, pooled=pooled: pconv(u, large_kernel, pooled, add=t),
                           x, y, radius=radius, into=0)  # x only as the residual: its output may overwrite it
            del y
        return maps.local(lambda t, s: onednn.conv(self.conv_out, self.ln_out(t), add=s), x, skip, radius=1)


def make_blocks(
    *,
    n_blocks: int,
    dim: int,
    pdim: int,
    conv_blocks: int,
    window_size: int,
    num_heads: int,
    exp_ratio: float,
    attn_type: str,
    use_ln: bool,
    proj_ratio: float = 2.0,
    conv_attention: Callable[[int], nn.Module] = ConvolutionalAttention,
) -> nn.ModuleList:
    """The ``blocks`` trunk shared by every variant: ``n_blocks`` identical :class:`ESCBlock`."""
    return nn.ModuleList(
        ESCBlock(
            dim=dim, pdim=pdim, conv_blocks=conv_blocks, window_size=window_size, num_heads=num_heads,
            exp_ratio=exp_ratio, proj_ratio=proj_ratio, use_ln=use_ln, attn_type=attn_type,
            conv_attention=conv_attention,
        )
        for _ in range(n_blocks)
    )


def shared_large_kernel(pdim: int, kernel_size: int) -> nn.Parameter:
    """The raw large kernel shared by all blocks; orthogonal rows stabilise early training (upstream)."""
    kernel = nn.Parameter(torch.empty(pdim, pdim, kernel_size, kernel_size))
    nn.init.orthogonal_(kernel)
    return kernel
