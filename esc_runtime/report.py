"""Which attention kernel really runs: the runtime's choice for inference, torch's dispatcher otherwise."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from esc_arch.attention import _FLEX_COMPILE_FAILED, WindowAttention, flex_compiler_available

from . import native
from .dispatch import choose
from .layers import Target


def attention_kernel(
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> str:
    """Describe the attention kernel that runs for ``model`` on ``device``/``dtype``: for inference, the one the
    runtime prepares (:func:`esc_runtime.prepare`); for training (the plain model), the one torch dispatches."""
    attn = next((m for m in model.modules() if isinstance(m, WindowAttention)), None) if model is not None else None
    backend = attn.attn_type if attn is not None else "sdpa"
    if backend == "naive":
        return "naive [explicit matmul + softmax]"
    if backend == "flex":
        if not flex_compiler_available():
            return "flex [eager flex_attention: no compiler for torch.compile here]"
        failed = [s for s in _FLEX_COMPILE_FAILED if s[0] == torch.device(device).type]
        return "flex [torch.compile flex_attention" + (
            f"; eager for {len(failed)} shape(s) that failed to compile]" if failed else "]")
    if attn is None:
        attn = WindowAttention(64, 32, 4)
    if not training and choose("window attention", attn, Target(torch.device(device), dtype)).implementation.name == "native":
        return f"native (CPU) [{native.WINDOW_ATTENTION_EVENT}]"
    return sdpa_kernel_name(device=device, dtype=dtype, num_heads=attn.num_heads, tokens=attn.window_size**2,
                            head_dim=attn.dim // attn.num_heads, training=training)


_KERNEL_NAMES = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_flash_attention": "flash (CUDA)",
    "_scaled_dot_product_efficient_attention": "memory-efficient (CUDA)",
    "_scaled_dot_product_cudnn_attention": "cuDNN (CUDA)",
    "_scaled_dot_product_attention_math": "math (unfused)",
}


def sdpa_kernel_name(
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_heads: int = 4,
    tokens: int = 1024,
    head_dim: int = 16,
    training: bool = False,
) -> str:
    """Which kernel ``scaled_dot_product_attention`` really runs for ESC-shaped inputs.

    torch falls back silently (e.g. to the math kernel when the bias requires grad, as it does in
    training), so this runs one small call under the profiler and reads the dispatched op.
    """
    device = torch.device(device)
    shape = (1, num_heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=training) for _ in range(3))
    bias = torch.zeros(1, num_heads, tokens, tokens, device=device, dtype=dtype, requires_grad=training)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.set_grad_enabled(training), torch.profiler.profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    names = [event.name.removeprefix("aten::") for event in prof.events()]
    for op, label in _KERNEL_NAMES.items():
        if op in names:
            return f"{label} [{op}]"
    return "unknown [" + ", ".join(n for n in names if "attention" in n) + "]"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler backend's native start/stop lines (written to fd 2, not sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
