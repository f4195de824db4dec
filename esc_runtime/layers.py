"""The implementations the runtime chooses from for each kind of ESC layer, fastest first.

Every implementation of a kind computes what the plain :mod:`esc_arch` module computes, called the same way:
``impl(layer, x, norm=..., add=...)`` is ``layer(norm(x)) + add`` (``norm``: the LayerNorm in front, or None;
``add``: the residual, or None), so an implementation may fuse either into its own pass. ``rejects(layer, target)``
says in a few words why an implementation cannot run a layer on a target, or None when it can: the
:mod:`esc_runtime.dispatch` takes the first that does not reject and keeps every reason.

The fast ones are for float32 CPU inference (the only setting they were measured in: ``benchmarks/README.md``);
the last of each list is the plain module, which runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from esc_arch.attention import WindowAttention
from esc_arch.blocks import ConvAttentionWrapper, ConvolutionalAttention
from esc_arch.layers import ConvFFN, pad_reflect, per_sample_depthwise_conv

from . import native, onednn, spectral


@dataclass(frozen=True)
class Target:
    """Where a prepared model runs."""

    device: torch.device
    dtype: torch.dtype

    @property
    def cpu_fp32(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.float32


@dataclass(frozen=True)
class Implementation:
    """One way to run a kind of layer: ``run(layer, x, norm=, add=, **extra)``; ``check(layer, target)`` returns
    why it cannot (a short phrase) or None."""

    name: str
    check: Callable[[nn.Module, Target], str | None]
    run: Callable[..., torch.Tensor]
    #: why this one runs where it is chosen (the native kernels' measured reason), or None
    why: Callable[[nn.Module, Target], str | None] = lambda layer, target: None

    def rejects(self, layer: nn.Module, target: Target) -> str | None:
        return self.check(layer, target)

    def __call__(self, layer: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.run(layer, x, **kwargs)


def _needs_cpu_fp32(target: Target) -> str | None:
    return None if target.cpu_fp32 else f"float32 CPU inference only (this is {target.dtype} on {target.device.type})"


def _needs_onednn(target: Target) -> str | None:
    if not target.cpu_fp32:
        return _needs_cpu_fp32(target)
    if not onednn.available():
        return "this torch has no oneDNN fused operators, or ESC_SR_ONEDNN=0"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is switched off (torch.backends.mkldnn)"
    return None


#: Which native kernel runs by default on which instruction-set variant, and why: the one place that says it, by
#: measurement against what runs otherwise (``python -m benchmarks native_avx2``; benchmarks/README.md, "Native CPU
#: kernels"). Kind -> variant -> (used by default, the reason the report gives). A variant forced by
#: ``ESC_RUNTIME_NATIVE`` (or ``native.select``) runs every kernel; ``disable=("native",)`` none.
NATIVE_BY_DEFAULT: dict[str, dict[str, tuple[bool, str]]] = {
    "window attention": {
        "avx512": (True, "AVX-512 variant measured faster than torch's CPU flash kernel (0.54-0.70x)"),
        "avx2": (True, "AVX2 variant measured faster than torch's CPU flash kernel"),
    },
    "ConvFFN": {
        "avx512": (True, "AVX-512 variant measured faster than oneDNN (0.56-0.73x)"),
        "avx2": (True, "AVX2 variant measured faster than oneDNN"),
    },
    "partial convolution": {
        "avx512": (True, "AVX-512 variant measured faster than the FFT path (0.66x)"),
        "avx2": (True, "AVX2 variant measured faster than the FFT path"),
    },
}


def native_default(kind: str) -> tuple[bool, str]:
    """Whether the native kernel of ``kind`` runs on the variant in use, and why (:data:`NATIVE_BY_DEFAULT`)."""
    variant = native.variant()
    if variant is None:
        return False, native.status()
    if native.forced():
        return True, f"{variant} variant, {native.status().split(' (', 1)[1].rsplit(') of ', 1)[0]}"  # chosen by ...
    return NATIVE_BY_DEFAULT[kind].get(variant, (False, f"{variant} variant not measured for this kernel"))


def _needs_native(target: Target, kind: str) -> str | None:
    if not target.cpu_fp32:
        return _needs_cpu_fp32(target)
    used, why = native_default(kind)
    return None if used else why


def _native_why(kind: str) -> Callable[[nn.Module, Target], str | None]:
    return lambda layer, target: native_default(kind)[1]


def _plain(layer: nn.Module, x: torch.Tensor, *, norm: nn.Module | None = None, add: torch.Tensor | None = None,
           **_: Any) -> torch.Tensor:
    out = layer(x if norm is None else norm(x))
    return out if add is None else out + add


def _always(layer: nn.Module, target: Target) -> None:
    return None


# ------------------------------------------------------------------------------------------ window attention


def _native_attention_check(layer: WindowAttention, target: Target) -> str | None:
    if layer.attn_type != "sdpa":
        return f"the model asks for the {layer.attn_type!r} backend"
    if layer.dim // layer.num_heads != native.HEAD_DIM or layer.window_size % 16:
        return f"head dimension {layer.dim // layer.num_heads} / window {layer.window_size} (needs 16 / a multiple of 16)"
    return _needs_native(target, "window attention")


def _native_attention(layer: WindowAttention, x: torch.Tensor, *, norm=None, add=None) -> torch.Tensor:
    """``to_qkv`` (with ``norm`` in the same pass; reflect padding commutes with a per-pixel norm) over raster-order
    pixels, the kernel reading each window's tokens where they lie and writing raster-order rows for ``to_out``: no
    partitioning copy either way, and the bias read from its table."""
    b, _, h, w = x.shape
    ws, dim = layer.window_size, layer.dim
    x = pad_reflect(x.contiguous(memory_format=torch.channels_last), right=(ws - w % ws) % ws, bottom=(ws - h % ws) % ws)
    hp, wp = x.shape[-2:]
    qkv = native.linear_rows(onednn.pixels(x), layer.to_qkv.weight, layer.to_qkv.bias, norm=norm)
    out = native.window_attention(qkv.contiguous(), layer.relative_position_bias, batch=b, height=hp, width=wp,
                                  heads=layer.num_heads, window=ws)
    del qkv
    return _project_out(layer, out.view(b, hp * wp, dim), h, w, add)


def _sdpa_cpu_check(layer: WindowAttention, target: Target) -> str | None:
    if layer.attn_type != "sdpa":
        return f"the model asks for the {layer.attn_type!r} backend"
    return None if target.device.type == "cpu" else "laid out for torch's CPU flash kernel"


def _sdpa_cpu(layer: WindowAttention, x: torch.Tensor, *, norm=None, add=None) -> torch.Tensor:
    """The sdpa arithmetic laid out for torch's CPU flash kernel: the input partitioned once into window-major
    channels-last tokens (``dim`` channels, a third of what partitioning q/k/v moves), the 1x1 convolutions as the
    GEMMs they are, heads as the outer batch axis so one head's bias is reused across windows, and the output copied
    once into raster order for ``to_out`` (``benchmarks/README.md``, "Window attention")."""
    if norm is not None:
        x = norm(x)
    b, _, h, w = x.shape
    ws, heads, dim = layer.window_size, layer.num_heads, layer.dim
    x = pad_reflect(x, right=(ws - w % ws) % ws, bottom=(ws - h % ws) % ws)
    hp, wp = x.shape[-2:]
    nh, nw = hp // ws, wp // ws
    c = dim // heads
    windows, tokens = b * nh * nw, ws * ws
    # (b, dim, nh, ws, nw, ws) -> (b, nh, nw, ws, ws, dim): window-major, channels last
    pixels = x.reshape(b, dim, nh, ws, nw, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, dim)
    qkv = onednn.linear(pixels, layer.to_qkv.weight.reshape(3 * dim, dim), layer.to_qkv.bias)
    del pixels
    # channels are (qkv, head, c): (windows, tokens, qkv, heads, c) -> q, k, v as (heads, windows, tokens, c) views
    q, k, v = qkv.view(windows, tokens, 3, heads, c).permute(2, 3, 0, 1, 4).unbind(0)
    del qkv  # q, k and v keep it alive until they go
    mask = layer.attention_bias(q.dtype).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    del q, k, v, mask  # free the projections before un-partitioning (peak memory)
    # (heads, b, nh, nw, ws, ws, c) -> (b, nh, ws, nw, ws, heads, c): raster-order pixels, channels last
    out = out.view(heads, b, nh, nw, ws, ws, c).permute(1, 2, 4, 3, 5, 0, 6).reshape(b, hp * wp, dim)
    return _project_out(layer, out, h, w, add)


def _project_out(layer: WindowAttention, out: torch.Tensor, h: int, w: int, add: torch.Tensor | None) -> torch.Tensor:
    """``to_out`` over the attended ``(b, hp * wp, dim)`` raster-order rows of the padded map, cropped to ``h x w``,
    plus ``add``."""
    b, dim = out.shape[0], layer.dim
    hp, wp = h + (-h) % layer.window_size, w + (-w) % layer.window_size
    weight = layer.to_out.weight.reshape(dim, dim)
    if onednn.applies(out):  # the rows are raster-order pixels: to_out's matmul writes a channels-last map
        if (hp, wp) == (h, w):  # nothing to crop: the residual is added in the same matmul
            residual = None if add is None else onednn.pixels(onednn.channels_last(add))
            return onednn.as_map(onednn.linear(out.view(-1, dim), weight, layer.to_out.bias, add=residual), b, h, w)
        out = onednn.as_map(onednn.linear(out.view(-1, dim), weight, layer.to_out.bias), b, hp, wp)[:, :, :h, :w]
        return out.contiguous(memory_format=torch.channels_last) if add is None else out + add
    out = torch.baddbmm(layer.to_out.bias.view(1, dim, 1), weight.expand(b, dim, dim), out.transpose(1, 2))
    out = out.view(b, dim, hp, wp)[:, :, :h, :w].contiguous()
    return out if add is None else out + add


ATTENTION = (
    Implementation("native", _native_attention_check, _native_attention, _native_why("window attention")),
    Implementation("sdpa-cpu-layout", _sdpa_cpu_check, _sdpa_cpu),
    Implementation("module", _always, _plain),
)


# ------------------------------------------------------------------------------------------ ConvFFN


def _native_ffn_check(layer: ConvFFN, target: Target) -> str | None:
    if layer.proj.in_channels % 16 or layer.dwc.kernel_size != (3, 3):
        return f"{layer.proj.in_channels} channels / a {layer.dwc.kernel_size[0]}x{layer.dwc.kernel_size[0]} " \
               "depthwise kernel (needs a multiple of 16 / 3x3)"
    return _needs_native(target, "ConvFFN")


def _native_ffn(layer: ConvFFN, x: torch.Tensor, *, norm=None, add=None) -> torch.Tensor:
    return native.conv_ffn(x, layer.proj, layer.dwc, layer.aggr, add, norm=norm)


def _onednn_ffn(layer: ConvFFN, x: torch.Tensor, *, norm=None, add=None) -> torch.Tensor:
    """Channels-last maps, GELU fused into the expansion and the depthwise convolution, the residual into the
    projection."""
    if norm is not None:
        x = norm(x)
    x = onednn.conv(layer.proj, x, gelu=True)
    x = onednn.conv(layer.dwc, x, gelu=True).add_(x)
    return onednn.conv(layer.aggr, x, add=add)


FFN = (
    Implementation("native", _native_ffn_check, _native_ffn, _native_why("ConvFFN")),
    Implementation("onednn", lambda layer, target: _needs_onednn(target), _onednn_ffn),
    Implementation("module", _always, _plain),
)


# ------------------------------------------------------------------------------------------ partial convolution
# ``run(layer, x, kernel=, dynamic=, add=)``: ``kernel`` is what ``prepare_kernel`` made of the large kernel once per
# forward pass, ``dynamic`` each sample's 3x3 kernel (from the whole map's average, also when x is a tile).


@dataclass(frozen=True)
class PartialConv(Implementation):
    """A partial-convolution implementation, with how it prepares the shared large kernel once per forward pass."""

    prepare_kernel: Callable[[Any, torch.Tensor], Any] = lambda kernel, x: kernel


def _is_esc_partial_conv(layer: ConvAttentionWrapper) -> str | None:
    return None if isinstance(layer.plk, ConvolutionalAttention) else "ESC-FP's decomposed kernel"


def _native_pconv_check(layer: ConvAttentionWrapper, target: Target) -> str | None:
    if (reason := _is_esc_partial_conv(layer)) or (reason := _needs_native(target, "partial convolution")):
        return reason
    return None if layer.aggr.in_channels % 16 == 0 else f"{layer.aggr.in_channels} channels (needs a multiple of 16)"


def _native_pconv(layer: ConvAttentionWrapper, x, *, kernel, dynamic, add=None) -> torch.Tensor:
    """The correlation by orbits of the geometric ensemble and the 1x1 projection in one pass."""
    return kernel.partial_conv_attention(x, dynamic, layer.aggr, add)


def _spectral_pconv_check(layer: ConvAttentionWrapper, target: Target) -> str | None:
    if (reason := _is_esc_partial_conv(layer)) or (reason := _needs_cpu_fp32(target)):
        return reason
    if not spectral.enabled():
        return "switched off (ESC_SR_FFT=0)"
    return None


def _spectral_kernel(kernel: torch.Tensor, x: torch.Tensor):
    """With its spectrum where the FFT repays itself (kernel and map large enough; smaller tiles of a streamed pass
    then run direct inside ``correlate``), else as it is."""
    big_enough = kernel.shape[-1] >= spectral.MIN_KERNEL and x.shape[-2] * x.shape[-1] >= spectral.MIN_PIXELS
    return spectral.SpectralKernel(kernel) if big_enough else kernel


def _correlate_into(plk: ConvolutionalAttention, x: torch.Tensor, kernel, dynamic: torch.Tensor) -> torch.Tensor:
    if not isinstance(kernel, spectral.SpectralKernel):
        return plk.convolve(x, kernel, dynamic)
    out = torch.empty_like(x)  # both kernels in one pass, written beside the untouched channels: no cat
    kernel.correlate(x[:, : plk.pdim], dynamic, out=out[:, : plk.pdim])
    out[:, plk.pdim :] = x[:, plk.pdim :]
    return out


def _spectral_pconv(layer: ConvAttentionWrapper, x, *, kernel, dynamic, add=None) -> torch.Tensor:
    return onednn.conv(layer.aggr, _correlate_into(layer.plk, x, kernel, dynamic), add=add)


def _plain_pconv(layer: ConvAttentionWrapper, x, *, kernel, dynamic, add=None) -> torch.Tensor:
    out = layer.aggr(layer.plk.convolve(x, kernel, dynamic))
    return out if add is None else out + add


PARTIAL_CONV = (
    PartialConv("native", _native_pconv_check, _native_pconv, _native_why("partial convolution"),
                prepare_kernel=lambda kernel, x: native.SymmetricKernel(kernel)),
    PartialConv("fft", _spectral_pconv_check, _spectral_pconv, prepare_kernel=_spectral_kernel),
    PartialConv("onednn", lambda layer, target: _needs_onednn(target),
                lambda layer, x, *, kernel, dynamic, add=None: onednn.conv(layer.aggr, layer.plk.convolve(x, kernel, dynamic), add=add)),
    PartialConv("module", _always, _plain_pconv),
)


# ------------------------------------------------------------------------------------------ 3x3 convolution + residual


def _onednn_conv(layer: nn.Conv2d, x: torch.Tensor, *, norm=None, add=None) -> torch.Tensor:
    return onednn.conv(layer, x if norm is None else norm(x), add=add)


CONVOLUTION = (
    Implementation("onednn", lambda layer, target: _needs_onednn(target), _onednn_conv),
    Implementation("module", _always, _plain),
)

#: Each kind of layer the runtime dispatches, and its implementations in order of preference.
KINDS: dict[str, tuple[Implementation, ...]] = {
    "window attention": ATTENTION,
    "ConvFFN": FFN,
    "partial convolution": PARTIAL_CONV,
    "closing convolution": CONVOLUTION,
}

__all__ = ["ATTENTION", "CONVOLUTION", "FFN", "Implementation", "KINDS", "NATIVE_BY_DEFAULT", "PARTIAL_CONV",
           "PartialConv", "Target", "native_default", "per_sample_depthwise_conv"]
