"""Which precision a run computes in: the one rule for ``esc_sr.upscale``, ``esc-sr`` and the ComfyUI nodes.

A name the user chose is kept (in its canonical spelling, :data:`esc_sr.facts.PRECISION_ALIASES`). ``'auto'`` is:

* fp32 for a model that declares ``supports_half = False`` (ESC-LTE: its query coordinates need more than fp16's
  11 bits of mantissa), on every device;
* fp32 on the CPU (half-precision convolutions are slower than fp32 there on most processors);
* on an accelerator, fp16 where it runs well (about twice as fast, and what users of GPUs expect), else bf16, else
  fp32. Which it runs well is the host's advice where it has one (ComfyUI knows which GPUs run half precision
  badly, and honours ``--force-fp32``); without advice: fp16 on CUDA and MPS.

:func:`resolve_precision` then maps the name to a dtype the device can run, or says why it cannot.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import facts
from .errors import EngineError

__all__ = ["DTYPES", "canonical", "for_model", "auto_precision", "choose", "resolve_precision"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ``runs(dtype) -> bool``: whether the device runs this dtype well (a host's advice).
DeviceAdvice = Callable[[torch.dtype], bool]


def canonical(precision: str) -> str:
    """``'auto'``, ``'fp32'``, ``'fp16'`` or ``'bf16'`` for any accepted spelling (``'half'``, ``'float32'``, ...)."""
    name = facts.PRECISION_ALIASES.get(precision, precision)
    if name not in facts.PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; use {', '.join(facts.PRECISIONS[:-1])} or "
                          f"{facts.PRECISIONS[-1]}")
    return name


def for_model(precision: str, model: Any) -> str:
    """``precision``, except ``'auto'`` for a model that must not run in half precision (``supports_half`` False),
    which is ``'fp32'``."""
    if precision == "auto" and not getattr(model, "supports_half", True):
        return "fp32"
    return precision


def _default_advice(device: torch.device) -> DeviceAdvice:
    return lambda dtype: dtype == torch.float16 and device.type in ("cuda", "mps")


def auto_precision(device: torch.device, runs: DeviceAdvice | None = None) -> str:
    """What ``'auto'`` is on ``device`` for a model that runs in half precision (see the module docstring)."""
    if device.type == "cpu":
        return "fp32"
    runs = runs or _default_advice(device)
    for name in ("fp16", "bf16"):
        if runs(DTYPES[name]):
            return name
    return "fp32"


def choose(precision: str, device: torch.device, model: Any = None, *, runs: DeviceAdvice | None = None) -> str:
    """The precision name a run of ``model`` on ``device`` uses: ``precision`` when it is not ``'auto'``, else the
    model's rule (:func:`for_model`), else the device's (:func:`auto_precision`, with the host's advice ``runs``)."""
    name = canonical(for_model(precision, model) if model is not None else precision)
    return auto_precision(device, runs) if name == "auto" else name


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Map ``'auto' | 'fp32' | 'fp16' | 'bf16'`` (or another spelling) to a dtype this device can run.

    Raises:
        EngineError: an unknown name, or bf16 where the device has none (MPS, older CUDA GPUs).
    """
    dtype = DTYPES[choose(precision, device)]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineError("this CUDA device does not support bf16; use --precision fp16 or fp32")
    if dtype == torch.bfloat16 and device.type == "mps":
        raise EngineError("bf16 is not supported on MPS; use fp16 or fp32")
    return dtype
