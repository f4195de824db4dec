"""ESC's convolutional attention (a shared large kernel plus a per-sample dynamic 3x3 kernel) and
the residual block that combines it with window attention."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import WindowAttention
from .layers import ConvFFN, LayerNorm2d, per_sample_depthwise_conv


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

    #: How a batch of per-sample depthwise kernels is applied (an exporter may substitute an equivalent).
    depthwise_conv = staticmethod(per_sample_depthwise_conv)

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.dwc_proj = _dynamic_kernel_mlp(pdim, pdim // 2)
        # Zero init: the dynamic kernel starts at 0 (upstream).
        nn.init.zeros_(self.dwc_proj[-1].weight)
        nn.init.zeros_(self.dwc_proj[-1].bias)

    def dynamic_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's ``(b, pdim, 3, 3)`` depthwise kernel, predicted from the global average of ``x[:, :pdim]``."""
        return self.dwc_proj(x[:, : self.pdim]).view(x.shape[0], self.pdim, 3, 3)

    def forward(self, x: torch.Tensor, large_kernel: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, large_kernel, self.dynamic_kernel(x))

    def convolve(self, x: torch.Tensor, large_kernel: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        """The partial convolution with a given dynamic kernel (``forward`` predicts it from ``x``)."""
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        k = large_kernel.shape[-1]
        x1 = F.conv2d(x1, large_kernel, padding=k // 2) + self.depthwise_conv(x1, dynamic, padding=1)
        return torch.cat([x1, x2], dim=1)


class DecomposedConvolutionalAttention(nn.Module):
    """ESC-FP's partial convolution: a 1x1 channel mix, then a depthwise large kernel to which the
    per-sample dynamic 3x3 kernel is added (zero-padded to the large kernel's size)."""

    depthwise_conv = staticmethod(per_sample_depthwise_conv)

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.proj = _dynamic_kernel_mlp(pdim, pdim // 4)

    def dynamic_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's ``(b, pdim, 3, 3)`` kernel, predicted from the global average of ``x[:, :pdim]``."""
        return self.proj(x[:, : self.pdim]).view(x.shape[0], self.pdim, 3, 3)

    def forward(self, x: torch.Tensor, large_kernel: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.convolve(x, large_kernel, self.dynamic_kernel(x))

    def convolve(self, x: torch.Tensor, large_kernel: tuple[torch.Tensor, torch.Tensor], dynamic: torch.Tensor):
        """The partial convolution with a given dynamic kernel (``forward`` predicts it from ``x``)."""
        lk_channel, lk_spatial = large_kernel
        x1, x2 = x[:, : self.pdim], x[:, self.pdim :]
        k = lk_spatial.shape[-1]
        pad = (k - 3) // 2
        kernels = F.pad(dynamic, (pad, pad, pad, pad)) + lk_spatial.view(1, self.pdim, k, k)
        x1 = self.depthwise_conv(F.conv2d(x1, lk_channel), kernels, padding=k // 2)
        return torch.cat([x1, x2], dim=1)


class ConvAttentionWrapper(nn.Module):
    """Partial convolutional attention followed by a 1x1 channel mix (``plk`` then ``aggr``)."""

    def __init__(self, dim: int, plk: nn.Module) -> None:
        super().__init__()
        self.plk = plk
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, large_kernel) -> torch.Tensor:
        return self.aggr(self.plk(x, large_kernel))


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

    def forward(self, x: torch.Tensor, large_kernel) -> torch.Tensor:
        skip = x
        x = self.proj(self.ln_proj(x))  # no residual around the first FFN (upstream)
        x = x + self.attn(self.ln_attn(x))
        for ln, ffn, pconv in zip(self.lns, self.convffns, self.pconvs):
            x = x + pconv(ffn(ln(x)), large_kernel)
        return self.conv_out(self.ln_out(x)) + skip


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
