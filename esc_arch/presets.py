"""Named configurations of the paper (and one small CPU-trainable one), each taking ``scale``."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .base import ESCModelBase
from .esc import ESC, ESCFP
from .esc_real import ESCReal, ESCRealM
from .lte import ESCLTE


def esc(scale: int = 4, **overrides: Any) -> ESC:
    """ESC (paper's base model): dim 64, 5 blocks x 5 conv blocks, window 32, 4 heads. 967,500 params at x4."""
    return ESC(**{"upscaling_factor": scale, **overrides})


def esc_light(scale: int = 4, **overrides: Any) -> ESC:
    """ESC-light: ESC with 3 blocks. 624,372 params at x4."""
    return ESC(**{"n_blocks": 3, "upscaling_factor": scale, **overrides})


def esc_xl(scale: int = 4, **overrides: Any) -> ESC:
    """ESC-XL: dim 192, pdim 48, 8 blocks, window 48, 12 heads, LayerNorm before each conv block."""
    kwargs = dict(dim=192, pdim=48, n_blocks=8, window_size=48, num_heads=12, use_ln=True, upscaling_factor=scale)
    return ESC(**{**kwargs, **overrides})


def esc_fp(scale: int = 4, **overrides: Any) -> ESCFP:
    """ESC-FP: decomposed large kernel, dim 48, 3 heads, bicubic residual. 539,263 params at x4."""
    return ESCFP(**{"upscaling_factor": scale, **overrides})


def esc_real(scale: int = 4, upsampler: str = "nearest+conv", **overrides: Any) -> ESCReal:
    """ESC-Real (real-world degradations): 10 blocks, FFN ratio 2, input skip branch, x4 head."""
    return ESCReal(**{"upscaling_factor": scale, "upsampler": upsampler, **overrides})


def esc_realm(scale: int = 4, upsampler: str = "nearest+conv", **overrides: Any) -> ESCRealM:
    """ESCRealM: ESC-Real with a selectable upsampler at x1-x4 (pixel-unshuffle below x3)."""
    return ESCRealM(**{"upscaling_factor": scale, "upsampler": upsampler, **overrides})


def esc_lte(scale: int | None = None, **overrides: Any) -> ESCLTE:
    """Arbitrary-scale ESC (ESC encoder + LTE decoder). 1,433,631 params. ``scale`` is ignored:
    the factor is chosen per call (``upscale_by``)."""
    return ESCLTE(**overrides)


def esc_tiny(scale: int = 4, **overrides: Any) -> ESC:
    """A small ESC for CPU training, the embedded default model's architecture: dim 32, 2 blocks x 5 conv blocks,
    window 16, 2 heads."""
    kwargs = dict(dim=32, pdim=8, n_blocks=2, conv_blocks=5, window_size=16, num_heads=2, upscaling_factor=scale)
    return ESC(**{**kwargs, **overrides})


#: The presets by name (each function's own name).
PRESETS: dict[str, Callable[..., ESCModelBase]] = {
    f.__name__: f for f in (esc, esc_light, esc_xl, esc_fp, esc_real, esc_realm, esc_lte, esc_tiny)
}


# Hyperparameters that do not define a configuration: the same preset at another scale or attention back end.
_NOT_CONFIGURATION = ("upscaling_factor", "attn_type")


@functools.lru_cache(maxsize=None)
def _preset_configuration(name: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
    with torch.device("meta"):  # no memory, no initialisation cost
        model = PRESETS[name]()
    return model.arch_name, tuple((k, v) for k, v in model.hyperparameters.items() if k not in _NOT_CONFIGURATION)


def match_preset(model: ESCModelBase) -> str | None:
    """The name of the preset ``model`` is an instance of (at any scale and attention back end), or None;
    ``esc_real`` and ``esc_realm`` match only with their default upsampler."""
    mine = (model.arch_name, tuple((k, v) for k, v in model.hyperparameters.items() if k not in _NOT_CONFIGURATION))
    return next((name for name in PRESETS if _preset_configuration(name) == mine), None)
