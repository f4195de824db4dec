"""The one memory model of an ESC forward pass on the device, read off the model itself: how much activation memory
a whole pass (or one tile) holds at its widest point per LR pixel, and what the whole maps of a layer-streamed pass
hold. The engine's tile sizes and its untiled/streamed decisions all come from here.

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

import torch
from torch import nn

from esc_arch.attention import WindowAttention
from esc_arch.layers import ConvFFN
from esc_arch.upsamplers import DySample

__all__ = ["activation_elements_per_pixel", "bytes_per_input_pixel", "streamed_map_bytes"]


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


def bytes_per_input_pixel(model: nn.Module, dtype: torch.dtype) -> float:
    """Estimated peak working memory per LR pixel of an untiled run or a tile (activations, not weights).

    :func:`activation_elements_per_pixel` (the widest phase of the forward pass, read off the
    model's layers) in ``dtype``, plus the padded input and the model's output kept for the host copy, with a 25 %
    margin for allocator slack; ``benchmarks/memory_estimate.py`` measures it per variant. OOM halving catches what
    an estimate misses.
    """
    element = torch.finfo(dtype).bits // 8
    scale = float(getattr(model, "scale", 4) or 4)
    return 1.25 * element * (activation_elements_per_pixel(model) + 3 + 3 * scale * scale)


def streamed_map_bytes(
    model: nn.Module, dtype: torch.dtype, height: int, width: int, *, outscale: float | None = None
) -> float:
    """Memory the whole maps of a layer-streamed ``height x width`` run hold on the device: at most four
    ``dim``-channel maps alive at once (the stem, a block's input, its running sum, which each residual stage
    overwrites, and an FFN output; five before, 5,337 against 4,447 MB measured at 2048x2048 x2), the
    input, the output (at ``outscale``, default the model's scale; the caller's host canvas is
    :func:`estimate_memory`'s), and for the arbitrary-scale model its two ``hidden_dim`` decoder maps and the decoded
    pixels twice (the chunks and their concatenation)."""
    element = torch.finfo(dtype).bits // 8
    hyper = model.hyperparameters
    channels = 4 * int(hyper.get("dim", 64)) + 3
    outputs = 3 * float(outscale if outscale is not None else model.scale) ** 2
    if getattr(model, "arbitrary_scale", False):
        channels += 2 * int(hyper.get("hidden_dim", 256))
        outputs *= 2
    return height * width * element * (channels + outputs)
