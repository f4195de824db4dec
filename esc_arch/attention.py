"""Window self-attention with ESC's relative-position bias, on three interchangeable back ends.

* ``sdpa`` (default): ``F.scaled_dot_product_attention`` with the bias as an additive mask, so
  torch picks its fused (flash) kernel wherever the device has one.  No backend is forced.  CPU inference in
  float32 runs :mod:`esc_runtime.native`'s window-attention kernel instead where it is built (the same arithmetic).
* ``flex``: ``flex_attention`` with the bias added in a ``score_mod``; compiled when a compiler
  is available, otherwise run eagerly (inference only on CPU: torch has no flex backward there).
* ``naive``: explicit ``softmax(q k^T / sqrt(d) + bias) v``, the reference.

The bias index ("key minus query", as upstream) is built once per window size with tensor ops
and shared by every block; upstream builds a Python-loop table per block (64 MiB each at window
32, about 1 GiB each for the XL window of 48).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from esc_runtime import native, onednn
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
    copies it from the host. Under tracing (torch.compile / export) it is built inline instead.
    """
    if onednn.tracing():
        return _build_relative_index(window_size, device)
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
        Nothing is baked where :mod:`esc_runtime.native`'s kernel runs this layer (float32 on a CPU that has it): it reads
        the table itself, and ESC's five gathered biases would be 80 MiB it never reads. A fused model moved to
        another device or dtype afterwards gathers its bias in each pass, as an unfused one does.
        """
        self.fused_bias = None
        heads, tokens = self.num_heads, self.window_size**2
        table = self.relative_position_bias
        if native.takes(table.device, table.dtype, head_dim=self.dim // heads, window=self.window_size):
            return
        if heads * tokens * tokens * table.element_size() <= BAKE_LIMIT_BYTES:
            self.fused_bias = self.attention_bias(self.relative_position_bias.dtype).detach()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None, norm: nn.Module | None = None) -> torch.Tensor:
        """Attention over ``norm(x)`` (``norm``: the block's LayerNorm, fused into ``to_qkv`` on the native path),
        projected by ``to_out``, plus ``add`` (the caller's residual; fused on the CPU)."""
        if self.attn_type == "sdpa" and x.device.type == "cpu" \
                and native.applies(x, head_dim=self.dim // self.num_heads, window=self.window_size):
            return self._forward_native(x, add, norm)
        if norm is not None:
            x = norm(x)
        if self.attn_type == "sdpa" and x.device.type == "cpu":
            return self._forward_sdpa_cpu(x, add)
        # naive (the reference, as upstream's 'Naive' path), flex, and sdpa off the CPU (the layout the GPU check
        # measured; the CPU one was tuned for torch's CPU flash kernel only): the 1x1 convolution, then the projections
        # partitioned into (windows, heads, tokens, c) by one permuting copy.
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
        out = self.to_out(out.reshape(b, self.dim, hp, wp).to(dtype)[:, :, :h, :w])
        return out if add is None else out + add

    def _forward_sdpa_cpu(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The sdpa path on CPU, laid out for torch's CPU flash kernel: the arithmetic of :meth:`forward`, other copies.
        Since 2026-12-07 CPU inference takes :meth:`_forward_native` where :mod:`esc_runtime.native` is built; this path
        remains for training on CPU and for machines without the native kernels.

        Profile of the old path (window 32, dim 64, 4 heads, 256x256 map, 1 thread, a 2-core AMD EPYC with a training
        job on the other core; torch.profiler, ms per forward pass): flash kernel 546 of 696; qkv convolution 58 (21 of
        them filling its output with the bias); partitioning q/k/v 51 (an 8-d permute whose innermost axis read with a
        stride of 65536); bias gather 14; un-partitioning 11; ``to_out`` 15.  This path instead:

        * partitions the input once, into window-major channels-last tokens: ``dim`` channels (a third of what
          partitioning q/k/v moves), read in rows of ``window`` pixels;
        * runs ``to_qkv`` and ``to_out`` as the GEMMs their 1x1 convolutions are (``addmm``/``baddbmm`` on the same
          parameters: state dict unchanged).  The qkv GEMM writes (windows, tokens, qkv, heads, c), so q, k and v
          are strided views that the flash kernel reads as they are (it takes any strides with c contiguous);
        * makes heads the batch (outer) axis of the attention and windows the inner one, with the bias as a
          (heads, 1, tokens, tokens) mask: the kernel walks batch, then heads, then query blocks, so one head's 4 MiB
          of bias is reused across all windows instead of all 16 MiB being streamed once per window (the kernel
          alone, 16 windows: 128 against 144 ms, median of 30, CPU time);
        * attends each whole window in one call. An earlier version cut windows of 768 queries or more into chunks
          below that (the kernel's smaller query blocks; 465 against 550 ms for the kernel alone, 1 thread, before
          :mod:`esc_sr.heap` kept freed memory); with freed memory reused, one call is as fast at 1 thread (the layer
          at window 32, 256x256: 435 against 437 ms) and faster at 2 (234 against 256 ms; an ESC x4 forward at
          192x320: 2.17 against 2.27 s), interleaved medians on the 2-core AMD EPYC VM;
        * copies the kernel's output, (heads, tokens, windows, c) in memory, once into raster order (pixels,
          channels; rows of c contiguous), from which the ``to_out`` GEMM writes NCHW directly; on the oneDNN path
          (:mod:`esc_runtime.onednn`: inference) both GEMMs are oneDNN matmuls, ``to_out`` writes a channels-last map
          and adds the residual in the same pass.

        The layer, interleaved with the old path in one process: 603 against 767 ms (median of 9; 1.27x); the flash
        kernel is then about 80 % of the pass, bound by its own GEMMs (``benchmarks/README.md``, window attention).
        """
        b, _, h, w = x.shape
        ws, heads, dim = self.window_size, self.num_heads, self.dim
        x = pad_reflect(x, right=(ws - w % ws) % ws, bottom=(ws - h % ws) % ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        c = dim // heads
        windows, tokens = b * nh * nw, ws * ws

        # (b, dim, nh, ws, nw, ws) -> (b, nh, nw, ws, ws, dim): window-major, channels last
        pixels = x.reshape(b, dim, nh, ws, nw, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, dim)
        qkv = onednn.linear(pixels, self.to_qkv.weight.reshape(3 * dim, dim), self.to_qkv.bias)
        del pixels
        # channels are (qkv, head, c): (windows, tokens, qkv, heads, c) -> q, k, v as (heads, windows, tokens, c) views
        q, k, v = qkv.view(windows, tokens, 3, heads, c).permute(2, 3, 0, 1, 4).unbind(0)
        del qkv  # q, k and v keep it alive until they go
        mask = self.attention_bias(q.dtype).unsqueeze(1)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        del q, k, v, mask  # free the projections before un-partitioning (peak memory)
        # (heads, b, nh, nw, ws, ws, c) -> (b, nh, ws, nw, ws, heads, c): raster-order pixels, channels last
        out = out.view(heads, b, nh, nw, ws, ws, c).permute(1, 2, 4, 3, 5, 0, 6).reshape(b, hp * wp, dim)
        return self._project_out(out, h, w, add)

    def _forward_native(self, x: torch.Tensor, add: torch.Tensor | None = None,
                        norm: nn.Module | None = None) -> torch.Tensor:
        """CPU inference on :mod:`esc_runtime.native`'s kernels: ``to_qkv`` (after ``norm``, a per-pixel LayerNorm, in the
        same pass; reflect padding commutes with it) over the raster-order pixels, the attention kernel reading each
        window's tokens from it where they lie and writing raster-order rows for ``to_out``; no partitioning copy
        either way, and the bias read from its table."""
        b, _, h, w = x.shape
        ws, dim = self.window_size, self.dim
        x = pad_reflect(onednn.channels_last(x), right=(ws - w % ws) % ws, bottom=(ws - h % ws) % ws)
        hp, wp = x.shape[-2:]
        qkv = native.linear_rows(onednn.pixels(x), self.to_qkv.weight, self.to_qkv.bias, norm=norm)
        out = native.window_attention(qkv.contiguous(), self.relative_position_bias, batch=b, height=hp, width=wp,
                                      heads=self.num_heads, window=ws)
        del qkv
        return self._project_out(out.view(b, hp * wp, dim), h, w, add)

    def _project_out(self, out: torch.Tensor, h: int, w: int, add: torch.Tensor | None) -> torch.Tensor:
        """``to_out`` over the attended ``(b, hp * wp, dim)`` raster-order rows of the padded map, cropped to ``h x w``,
        plus ``add``."""
        b, dim = out.shape[0], self.dim
        hp, wp = h + (-h) % self.window_size, w + (-w) % self.window_size
        weight = self.to_out.weight.reshape(dim, dim)
        if onednn.applies(out):  # the rows are raster-order pixels: to_out's matmul writes a channels-last map
            if (hp, wp) == (h, w):  # nothing to crop: the residual is added in the same matmul
                residual = None if add is None else onednn.pixels(onednn.channels_last(add))
                return onednn.as_map(onednn.linear(out.view(-1, dim), weight, self.to_out.bias, add=residual), b, h, w)
            out = onednn.as_map(onednn.linear(out.view(-1, dim), weight, self.to_out.bias), b, hp, wp)[:, :, :h, :w]
            return out.contiguous(memory_format=torch.channels_last) if add is None else out + add
        out = torch.baddbmm(self.to_out.bias.view(1, dim, 1), weight.expand(b, dim, dim), out.transpose(1, 2))
        out = out.view(b, dim, hp, wp)[:, :, :h, :w].contiguous()
        return out if add is None else out + add

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
