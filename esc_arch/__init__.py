"""ESC-SR: the ESC super-resolution family (Lee, Yun, Ro, ICCV 2025) in one weight-compatible definition.

Quick start::

    import esc_arch
    model = esc_arch.load_model("ESC_DIV2K_X4.pth")      # any official / neosr / traiNNer / BasicSR file
    sr = model(lr)                                      # NCHW RGB in [0, 1]
    net = esc_arch.esc_light(scale=2, attn_type="naive")  # presets
    esc_arch.set_attention_backend(net, "sdpa")
    esc_arch.fuse(net)                                  # inference: bake constant tensors once
"""

from __future__ import annotations

import torch
from torch import nn

__version__ = "0.1.0"

from esc_runtime import native  # noqa: E402
from .attention import ATTENTION_BACKENDS, WindowAttention, sdpa_kernel_name  # noqa: E402
from .base import ESCModelBase  # noqa: E402
from .checkpoint import canonicalize_state_dict, load_model, read_state_dict, save_model  # noqa: E402
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


def attention_kernel(
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> str:
    """Describe the attention kernel that will run for ``model`` on ``device``/``dtype``.

    For the 'sdpa' backend: CPU inference in float32 runs :mod:`esc_runtime.native`'s kernel where it is available;
    otherwise this probes torch's dispatcher (see :func:`sdpa_kernel_name`), since torch silently falls back to the
    unfused math kernel in some cases, such as training on CPU.
    """
    attn = next((m for m in model.modules() if isinstance(m, WindowAttention)), None) if model is not None else None
    backend = attn.attn_type if attn is not None else "sdpa"
    if backend == "naive":
        return "naive [explicit matmul + softmax]"
    if backend == "flex":
        from .attention import _FLEX_COMPILE_FAILED, flex_compiler_available

        if not flex_compiler_available():
            return "flex [eager flex_attention: no compiler for torch.compile here]"
        failed = [s for s in _FLEX_COMPILE_FAILED if s[0] == torch.device(device).type]
        return "flex [torch.compile flex_attention" + (f"; eager for {len(failed)} shape(s) that failed to compile]" if failed else "]")
    heads, window, head_dim = (4, 32, 16) if attn is None else (attn.num_heads, attn.window_size, attn.dim // attn.num_heads)
    tokens = window**2
    if not training and native.takes(device, dtype, head_dim=head_dim, window=window):
        return f"native (CPU) [{native.WINDOW_ATTENTION_EVENT}]"
    return sdpa_kernel_name(device=device, dtype=dtype, num_heads=heads, tokens=tokens, head_dim=head_dim, training=training)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES", "ATTENTION_BACKENDS", "CheckpointError", "ESC", "ESCFP", "ESCLTE", "ESCReal", "ESCRealM", "ESCError", "ESCModelBase", "ESCError",
    "PRESETS", "attention_kernel", "canonicalize_state_dict", "count_parameters", "detect_architecture", "esc",
    "esc_fp", "esc_light", "esc_lte", "esc_real", "esc_realm", "esc_tiny", "esc_xl", "fuse", "infer_architecture",
    "load_model", "match_preset", "pad_reflect", "pad_to_multiple", "read_state_dict", "save_model", "set_attention_backend", "VARIANTS",
]
