"""How much activation memory an ESC forward pass holds at its widest point, per LR pixel, read off the model itself.

Inference frees each intermediate as soon as nothing refers to it, so the peak is the widest *phase* of the pass:

* the trunk: an FFN holds about three of its hidden maps (expand, GELU, depthwise, the sum: each freed as the
  next is made) beside its input and output; window attention holds the qkv projection and its window partition
  (3 ``dim`` each) and the attention output before and after un-partitioning; the explicit ('naive') kernel also
  holds every window's score matrix twice (scores and softmax);
* the upsampling head: each layer's input and output at their own resolution (a nearest+conv head's last convolution
  runs at the full output size); DySample holds its sampling offsets and coordinates (fp32) and the sampled map at
  the output size;
* the arbitrary-scale model: the trunk, then its two ``hidden_dim`` decoder maps.

Counted in elements, so any precision scales it; ``benchmarks/memory_estimate.py`` checks it against measured peaks.
"""

from __future__ import annotations

from torch import nn

from esc_arch.attention import WindowAttention
from esc_arch.layers import ConvFFN
from esc_arch.upsamplers import DySample

__all__ = ["activation_elements_per_pixel"]


def _dim(model: nn.Module) -> int:
    return int((getattr(model, "hyperparameters", None) or {}).get("dim", 64))


def _trunk(model: nn.Module) -> float:
    dim = _dim(model)
    hidden = max((m.proj.out_channels for m in model.modules() if isinstance(m, ConvFFN)), default=dim)
    ffn = 3 * hidden + 2 * dim
    attention = 8 * dim
    for module in model.modules():
        if isinstance(module, WindowAttention) and module.attn_type == "naive":
            attention += 2 * module.num_heads * module.window_size**2
            break
    return float(max(ffn, attention))


def _sequential_head(layers: list[nn.Module], channels: int) -> float:
    """Peak of a chain of layers: the largest input + output pair, each at its own resolution (per LR pixel)."""
    area, peak = 1.0, 0.0
    for layer in layers:
        size_in = channels * area
        if isinstance(layer, nn.Upsample):
            area *= float(layer.scale_factor) ** 2
        elif isinstance(layer, nn.PixelShuffle):
            area *= layer.upscale_factor**2
            channels //= layer.upscale_factor**2
        elif isinstance(layer, nn.ConvTranspose2d):
            area *= layer.stride[0] * layer.stride[1]
            channels = layer.out_channels
        elif isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, DySample):
            s2 = layer.scale**2
            offsets = layer.offset.out_channels  # 2 * groups * s^2 sampling offsets, and the coordinates from them
            out = layer.end_conv.out_channels if layer.end_conv is not None else channels
            peak = max(peak, size_in + 2 * offsets * area + channels * s2 * area + out * s2 * area)
            channels, area = out, area * s2
            continue
        elif getattr(layer, "inplace", False):
            continue
        peak = max(peak, size_in + channels * area)
    return peak


def _head(model: nn.Module) -> float:
    dim = _dim(model)
    head = getattr(model, "to_img", None)
    if head is None:
        return 0.0
    if isinstance(head, nn.Sequential):
        return _sequential_head(list(head), dim)
    if isinstance(head, DySample):
        return _sequential_head([head], dim)
    # A conv to 3*s^2 channels, then pixel shuffle and an image residual of the same size, and their sum.
    outputs = head.out_channels
    return float(dim + 4 * outputs)


def activation_elements_per_pixel(model: nn.Module) -> float:
    """Activation elements alive at the widest point of an inference forward pass, per LR input pixel."""
    dim = _dim(model)
    peak = max(_trunk(model), _head(model)) + 2 * dim  # + the stem and a block's input, alive throughout
    if getattr(model, "arbitrary_scale", False):
        peak = max(peak, 2 * int(model.hyperparameters.get("hidden_dim", 256)) + dim)
    # A pixel-unshuffled trunk (ESCRealM below x3) runs on 1/unshuffle^2 of the input pixels, and its head with it.
    return float(peak) / getattr(model, "unshuffle", 1) ** 2
