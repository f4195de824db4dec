"""The ESC super-resolution family (Lee, Yun, Ro, ICCV 2025) as plain PyTorch, in one weight-compatible definition:
the models and their presets, ``fuse()``, and checkpoint loading with detection (README.md, "Python API")::

    model = esc_arch.load_model("ESC_DIV2K_X4.pth")      # any official / neosr / traiNNer / BasicSR file
    sr = model(lr)                                      # NCHW RGB in [0, 1]
    net = esc_arch.fuse(esc_arch.esc_light(scale=2))     # a preset; inference: constant tensors baked once
"""

from __future__ import annotations

from torch import nn

__version__ = "0.1.0"

from .attention import ATTENTION_BACKENDS, WindowAttention  # noqa: E402
from .base import ESCModelBase  # noqa: E402
from .checkpoint import EMBEDDED_MODELS, canonicalize_state_dict, load_model, read_state_dict  # noqa: E402
from .detection import ARCHITECTURES, VARIANTS, detect_architecture, infer_architecture  # noqa: E402
from .errors import CheckpointError, ESCError  # noqa: E402
from .esc import ESC, ESCFP  # noqa: E402
from .esc_real import ESCReal, ESCRealM  # noqa: E402
from .layers import pad_reflect, pad_to_multiple  # noqa: E402
from .lte import ESCLTE, ESCEncoder  # noqa: E402
from .presets import PRESETS, esc, match_preset, esc_fp, esc_light, esc_lte, esc_real, esc_realm, esc_tiny, esc_xl  # noqa: E402


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every ESC window-attention layer inside ``model`` to 'sdpa', 'flex' or 'naive' (in place)."""
    for module in model.modules():
        if isinstance(module, ESCModelBase):
            module.set_attention_backend(backend)
    return model


def fuse(model: nn.Module) -> nn.Module:
    """Re-parameterise ``model`` for inference, in place (as timm's ``reparameterize``, upstream's ``convert()``):
    every ESC model inside it bakes its ensembled large kernel and attention biases once and is put in eval mode.
    Outputs are unchanged. A fused model refuses ``train()`` and ``load_state_dict``; load weights first."""
    for module in model.modules():
        if isinstance(module, ESCModelBase):
            module.fuse()
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES", "ATTENTION_BACKENDS", "EMBEDDED_MODELS", "CheckpointError", "ESC", "ESCFP", "ESCLTE", "ESCReal", "ESCRealM", "ESCError", "ESCModelBase",
    "PRESETS", "canonicalize_state_dict", "count_parameters", "detect_architecture", "esc",
    "esc_fp", "esc_light", "esc_lte", "esc_real", "esc_realm", "esc_tiny", "esc_xl", "fuse", "infer_architecture",
    "load_model", "match_preset", "pad_reflect", "pad_to_multiple", "read_state_dict", "set_attention_backend", "VARIANTS",
]
