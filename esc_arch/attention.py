"""Window self-attention with ESC's relative-position bias, on three interchangeable back ends.

* ``sdpa`` (default): ``F.scaled_dot_product_attention`` with the bias as an additive mask, so
  torch picks its fused kernel wherever the device has one.  No kernel is forced.
* ``flex``: ``flex_attention`` with the bias added in a ``score_mod``; compiled when a compiler
  is available, otherwise run eagerly (inference only on CPU: torch has no flex backward there).
* ``naive``: explicit ``softmax(q k^T / sqrt(d) + bias) v``, the reference.

The bias index ("key minus query", as upstream) is built once per window size with tensor ops
and shared by every block; upstream builds a Python-loop table per block (64 MiB each at window
32, about 1 GiB each for the XL window of 48).
"""

from __future__ import annotations

import functools
import math
import shutil
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .layers import pad_reflect

AttentionBackend = Literal["sdpa", "flex", "naive"]
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "flex", "naive")

#: The largest attention bias :meth:`WindowAttention.bake` keeps (ESC's window 32 with 4 heads: 16 MiB).
BAKE_LIMIT_BYTES = 64 * 2**20


def normalize_backend(name: str) -> str:
    """Map user spellings (upstream's 'Naive'/'SDPA'/'Flex' included) to a backend name."""
    key = str(name).strip().lower()
    if key not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return key


def _build_relative_index(window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    coords = torch.arange(window_size * window_size, device=device)
    row, col = coords // window_size, coords % window_size
    span = 2 * window_size - 1
    # index[q, k] = (k_r - q_r + ws - 1) * (2ws - 1) + (k_c - q_c + ws - 1)
    return (row[None, :] - row[:, None] + window_size - 1) * span + (col[None, :] - col[:, None] + window_size - 1)


@functools.lru_cache(maxsize=16)
def _shared_relative_index(window_size: int, device: torch.device) -> torch.Tensor:
    # Built outside inference mode: an inference tensor in this shared table would break any later training
    # forward in the same process ("Inference tensors cannot be saved for backward").
    with torch.inference_mode(False), torch.no_grad():
        return _build_relative_index(window_size, device)


def relative_position_index(window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(ws^2, ws^2) LongTensor mapping (query token, key token) to a column of the bias table.

    One table per (window size, device), built on that device and shared by every block, so a forward pass never
    copies it from the host.
    """
    return _shared_relative_index(window_size, torch.device(device))


@functools.lru_cache(maxsize=1)
def flex_compiler_available() -> bool:
    """Whether ``torch.compile`` can build flex_attention here (a C++ compiler on CPU; on CUDA, Triton)."""
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


# Shapes (device, dtype, heads, tokens, head_dim) whose compilation failed; they run eagerly, and said so.
_FLEX_COMPILE_FAILED: set[tuple] = set()


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def _flex_attention(q, k, v, bias):
    from torch.nn.attention.flex_attention import flex_attention

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    signature = (q.device.type, q.dtype, *q.shape[1:])
    if signature not in _FLEX_COMPILE_FAILED and flex_compiler_available():
        try:
            return _compiled_flex_attention()(q, k, v, score_mod=add_bias)
        except Exception as error:
            if _is_out_of_memory(error):
                raise  # a real OOM: the caller (the engine's tile halving) must see it
            # inductor has CPU code-generation bugs for some shapes (ESC-FP's 3 heads on CPU, for one)
            _FLEX_COMPILE_FAILED.add(signature)
            warnings.warn(
                f"torch.compile of flex_attention failed for {signature} ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}); this shape now runs "
                "flex_attention eagerly, which materialises the whole score matrix",
                RuntimeWarning, stacklevel=2,
            )
    return flex_attention(q, k, v, score_mod=add_bias)


class WindowAttention(nn.Module):
    """Non-overlapping window attention over an NCHW feature map (no shift, no mask).

    The map is reflect-padded on the right/bottom to a multiple of the window, attended window by
    window, cropped back, then projected by ``to_out``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, attn_type: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.attn_type = normalize_backend(attn_type)
        self.relative_position_bias = nn.Parameter(torch.randn(num_heads, (2 * window_size - 1) ** 2) * 0.001)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.register_buffer("fused_bias", None, persistent=False)  # set by bake()

    # -- bias ---------------------------------------------------------------------------------
    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The (heads, ws^2, ws^2) additive bias: baked by :meth:`bake`, else gathered from the table."""
        if self.fused_bias is not None:
            return self.fused_bias.to(dtype)
        table = self.relative_position_bias
        # index_select on the flat index, not table[:, index]: the same values, about 3.5x faster on CPU (window 32,
        # 4 heads: 3.4 ms against 12.1 ms per call, median of 20, 1 thread); its backward is index_add.
        tokens = self.window_size**2
        index = relative_position_index(self.window_size, table.device).reshape(-1)
        return table.index_select(1, index).view(-1, tokens, tokens).to(dtype)

    @torch.no_grad()
    def bake(self) -> None:
        """Store the gathered bias (a buffer: it follows ``.to()``/``.half()``; not saved in state dicts).

        Biases over :data:`BAKE_LIMIT_BYTES` stay derived per forward pass: ESC-XL's would hold 254 MiB per block
        (12 heads x 2304^2 floats), 2 GiB for the model, to save a gather that costs far less than the attention.
        A fused model moved to another device or dtype afterwards gathers its bias in each pass, as an unfused one
        does.
        """
        self.fused_bias = None
        heads, tokens = self.num_heads, self.window_size**2
        table = self.relative_position_bias
        if heads * tokens * tokens * table.element_size() <= BAKE_LIMIT_BYTES:
            self.fused_bias = self.attention_bias(table.dtype).detach()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ws, heads = self.window_size, self.num_heads
        x = pad_reflect(x, right=(ws - w % ws) % ws, bottom=(ws - h % ws) % ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        c = self.dim // heads

        qkv = self.to_qkv(x)
        dtype = qkv.dtype
        # channels are (qkv, head, c); windows are batch-major, then row, then column.
        qkv = qkv.view(b, 3, heads, c, nh, ws, nw, ws).permute(1, 0, 4, 6, 2, 5, 7, 3)
        q, k, v = qkv.reshape(3, b * nh * nw, heads, ws * ws, c).unbind(0)

        out = self._attend(q, k, v, self.attention_bias(q.dtype))
        del qkv, q, k, v  # free the partitioned projections before un-partitioning (peak memory)

        out = out.view(b, nh, nw, heads, ws, ws, c).permute(0, 3, 6, 1, 4, 2, 5)
        return self.to_out(out.reshape(b, self.dim, hp, wp).to(dtype)[:, :, :h, :w])

    def _attend(self, q, k, v, bias):
        if self.attn_type == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        if self.attn_type == "flex":
            if torch.is_grad_enabled() and q.requires_grad and q.device.type == "cpu":
                raise RuntimeError(
                    "the 'flex' attention backend cannot train on CPU (torch has no flex_attention backward "
                    "there); use 'sdpa' or 'naive' for training"
                )
            return _flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), bias)
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1) + bias
        return scores.softmax(dim=-1) @ v
