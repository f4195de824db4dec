"""CPU inference on oneDNN: channels-last feature maps, 1x1 convolutions as oneDNN matmuls and the other convolutions
as oneDNN convolutions, each with its GELU or residual add fused in.

Why: a 1x1 convolution on a channels-last map *is* a matmul with no copy on either side, oneDNN's matmul runs far
closer to the core's peak than the BLAS torch calls at these shapes, and a fused GELU or residual saves a pass over
the map (``benchmarks/README.md``, "CPU inference on oneDNN").

The runtime chooses this path when a model is prepared for float32 CPU inference on a torch with oneDNN's fused
operators (:func:`available`: checked once; ``ESC_SR_ONEDNN=0`` turns it off). The functions still fall back to
``F.conv2d`` and plain PyTorch where a call cannot take it (autograd, tracing, another dtype): same outputs to float
rounding, the state dict untouched.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from . import switches

__all__ = ["tracing", "available", "applies", "channels_last", "pixels", "as_map", "linear", "conv"]


def tracing() -> bool:
    """Under ONNX export, TorchScript tracing, torch.export or torch.compile."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() \
        or torch.compiler.is_exporting()


def transformed() -> bool:
    """Under forward-mode AD (a dual level is open: ``torch.no_grad`` does not switch dual tensors off) or a
    ``torch.func`` transform (jvp, vmap, grad). The fast paths compute on plain storage and would drop the tangents
    or the batch dimension; torch's own operators carry them, or raise where they cannot."""
    return forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this process can take the oneDNN path at all (the platform, the build, the environment)."""
    if not switches.enabled("ESC_SR_ONEDNN"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 2), torch.ones(3, 2), None, "gelu", [], "none")
        image = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        torch.ops.mkldnn._convolution_pointwise(image, torch.ones(2, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], 2, "gelu",
                                                [], "none")
        torch.ops.mkldnn._convolution_pointwise.binary(image, image, torch.ones(2, 2, 1, 1), None, [0, 0], [1, 1],
                                                       [1, 1], 1, "add", None, None, [], None)
    except (AttributeError, RuntimeError):
        return False
    return tuple(probe.shape) == (2, 3)


def applies(x: torch.Tensor) -> bool:
    """Whether a model call on ``x`` takes the oneDNN path (see the module docstring)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and not tracing() \
        and not transformed() and torch.backends.mkldnn.enabled and available()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory where the oneDNN path applies (a no-op when it already is), else ``x``."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and applies(x) else x


def pixels(x: torch.Tensor) -> torch.Tensor:
    """An NCHW map as a ``(pixels, channels)`` matrix in raster order: a view of a channels-last map, else a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def as_map(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """``(pixels, channels)`` rows in raster order as a channels-last NCHW map (a view)."""
    return rows.view(batch, height, width, -1).permute(0, 3, 1, 2)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a ``(rows, in)`` matrix, then exact GELU (``gelu``) or ``+ add`` (``(rows, out)``):
    one fused oneDNN matmul where the path applies, else ``F.linear`` (torch's addmm) and separate operators."""
    _check_epilogue(gelu, add)
    if applies(x):
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    return _epilogue(F.linear(x, weight, bias), gelu, add)


def conv(conv: nn.Conv2d, x: torch.Tensor, *, gelu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)``, then exact GELU (``gelu``) or ``+ add`` (a map of the output's shape), in one oneDNN pass where
    the path applies: a 1x1 convolution as a fused matmul (:func:`linear`; a map that is not channels-last is copied
    into rows first), any other as oneDNN's convolution with the GELU or the addition as its post-op; the output is
    channels-last. Otherwise ``F.conv2d`` and separate operators."""
    _check_epilogue(gelu, add)
    if conv.padding_mode != "zeros" or not applies(x):
        return _epilogue(conv(x), gelu, add)
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0):
        weight = conv.weight.view(conv.out_channels, conv.in_channels)
        out = linear(pixels(x), weight, conv.bias, gelu=gelu, add=None if add is None else pixels(channels_last(add)))
        return as_map(out, x.shape[0], *x.shape[-2:])
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    x = channels_last(x)
    if add is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, channels_last(add), conv.weight, conv.bias, *geometry,
                                                              "add", None, None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *geometry, "gelu" if gelu else "none",
                                                   [], "none" if gelu else "")


def _check_epilogue(gelu: bool, add: torch.Tensor | None) -> None:
    if gelu and add is not None:
        raise ValueError("GELU or an addition can be fused, not both")


def _epilogue(out: torch.Tensor, gelu: bool, add: torch.Tensor | None) -> torch.Tensor:
    if gelu:
        return F.gelu(out)
    return out if add is None else out + add
