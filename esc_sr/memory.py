"""Memory: how much there is (per device), what a job needs (estimated from the model), and out-of-memory errors.

The estimates are deliberately conservative (measured peaks stay below them); they decide whether an image runs
untiled, layer-streamed or in crop-overlap tiles, and whether a job is refused before anything is allocated.
"""

from __future__ import annotations

import gc
from typing import Literal, Union

import torch
from torch import nn

from esc_runtime.footprint import bytes_per_input_pixel, streamed_map_bytes  # noqa: F401 (the one per-pixel model)

from . import heap
from .errors import EngineError, OutOfMemory

# Upper bounds for the tiles of tile='auto' (when the image does not fit untiled).
AUTO_MAX_TILE_CPU = 512

AUTO_MAX_TILE_ACCELERATOR = 2048

# Fraction of free memory tile='auto' lets a tile use, and an absolute cap on CPU, where the
# kernel's OOM killer (not a catchable error) is what usually answers an over-allocation.
AUTO_MEMORY_FRACTION = 0.5

AUTO_CPU_BUDGET_CAP = 1 << 30


# ---------------------------------------------------------------------------------- out of memory


_OOM_MESSAGES = (
    "out of memory",  # CUDA, MPS, HIP
    "can't allocate memory",  # CPU DefaultCPUAllocator on Linux/macOS
    "not enough memory",  # CPU allocator on Windows
    "failed to allocate",
    "cannot allocate memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM, CPU allocation failures and Python ``MemoryError``."""
    if isinstance(exc, MemoryError) and not isinstance(exc, OutOfMemory):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


# ----------------------------------------------------------------------------------- free memory


def free_memory_bytes(device: torch.device) -> int:
    """Memory a tile may use on ``device``: free device memory, or available RAM on CPU (:func:`available_memory`)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory held by torch's caching allocator but unused is free for us too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    return available_memory()


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # optional; present on many machines (Windows/macOS fallback)

        return int(psutil.virtual_memory().available)
    except Exception:
        return 4 << 30  # unknown: assume a modest machine


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable`` on Linux; psutil elsewhere; 4 GiB when unknown), and the freed
    memory the heap holds for this process's reuse in a batch scope (:func:`esc_sr.heap.held_bytes`)."""
    return _available_ram_bytes() + heap.held_bytes()


MemorySpec = Union[Literal["auto"], int, None]


def memory_limit(max_memory: MemorySpec) -> tuple[int | None, str]:
    """``max_memory`` as bytes (None: no limit) and how to describe it."""
    if max_memory is None:
        return None, "no limit"
    if isinstance(max_memory, str) and max_memory == "auto":
        return available_memory(), "the memory available now"
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise EngineError(f"max_memory must be 'auto', a positive number of bytes or None, not {max_memory!r}")
    return max_memory, "the limit set"


def format_bytes(nbytes: float) -> str:
    """``1.5 GB``-style (powers of 1000, as ``--max-memory`` reads them)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


# ------------------------------------------------------------------------------------- estimates


def window_of(model: nn.Module) -> int:
    return max(1, int(getattr(model, "window_size", 1) or 1))


def output_size(height: int, width: int, outscale: float) -> tuple[int, int]:
    return max(1, round(height * outscale)), max(1, round(width * outscale))


def estimate_memory(
    height: int, width: int, channels: int, model: nn.Module, *, outscale: float | None = None,
    bytes_per_sample: int = 1, alpha: str = "model",
) -> int:
    """Bytes one :func:`upscale` of a ``height x width x channels`` image needs besides the model and one tile:
    its float copies, the output canvas at the model's scale, the resized result when ``outscale`` differs from
    the model's scale, and the output in the input's sample size (``bytes_per_sample``: 1, 2 or 4), twice (the
    copy the caller encodes). Conservative: measured peaks stay below it."""
    arbitrary = getattr(model, "arbitrary_scale", False)
    native = None if arbitrary else int(model.scale)
    if outscale is None and arbitrary:
        raise EngineError("an arbitrary-scale model needs outscale (the upscaling factor)")
    outscale = float(native if outscale is None else outscale)
    colour = 3
    alpha_channels = 1 if channels in (2, 4) else 0
    in_px = height * width
    out_h, out_w = output_size(height, width, outscale)
    out_px = out_h * out_w
    model_px = out_px if arbitrary else (height * native) * (width * native)
    model_runs = 1 + (alpha_channels if alpha == "model" else 0)
    need = in_px * channels * 4 * 2 + in_px * colour * 4  # float copy, planes, padded input
    need += model_px * 4 * colour * model_runs  # canvases (alpha runs as a 3-channel gray image)
    if arbitrary or outscale != native:
        need += out_px * channels * 4 * 3  # the resize, its clamp, its planes
    need += out_px * channels * 4  # the result planes
    need += out_px * channels * max(1, bytes_per_sample) * 3  # converted, made contiguous, encoded
    return int(need)


def check_memory(
    height: int, width: int, channels: int, model: nn.Module, *, outscale: float | None = None,
    bytes_per_sample: int = 1, alpha: str = "model", max_memory: MemorySpec = "auto", batch: int = 1,
) -> None:
    """Raise :class:`OutOfMemory` before anything is allocated when :func:`estimate_memory` exceeds ``max_memory``
    (``'auto'``: the RAM available now; an int: bytes; None: no check), for ``batch`` such images. The message
    names the image size, the output size, the memory needed, the limit and how to raise it."""
    limit, what = memory_limit(max_memory)
    if limit is None:
        return
    need = batch * estimate_memory(height, width, channels, model, outscale=outscale, bytes_per_sample=bytes_per_sample,
                                   alpha=alpha)
    if need <= limit:
        return
    factor = float(int(model.scale) if outscale is None else outscale)
    out_h, out_w = output_size(height, width, factor)
    images = f"a batch of {batch} {width}x{height} images" if batch > 1 else f"a {width}x{height} image"
    raise OutOfMemory(
        f"{images} upscaled x{factor:g} (to {out_w}x{out_h}) needs about {format_bytes(need)} of "
        f"memory, above {format_bytes(limit)} ({what}); refused before running the model "
        "(--max-memory, or upscale(max_memory=...), raises the limit)"
    )


def fits_untiled(
    model: nn.Module, device: torch.device, dtype: torch.dtype, height: int, width: int, *,
    fraction: float = AUTO_MEMORY_FRACTION,
) -> bool:
    """Whether the untiled working set of a ``height x width`` LR image fits ``fraction`` of the memory free on
    ``device`` (default: the auto-tiling margin). Untiled is the fastest way to run an image: no context is computed
    twice and the global pools need no statistics pass. The estimate per pixel is conservative: measured live peaks
    of ten variants on CPU were 0.60-0.86x of it, 0.84-1.45x with the heap policy (``benchmarks/memory_estimate.py``)."""
    window = window_of(model)
    pixels = (-(-height // window) * window) * (-(-width // window) * window)
    return pixels * bytes_per_input_pixel(model, dtype) <= free_memory_bytes(device) * fraction


def device_bytes(model: nn.Module, dtype: torch.dtype, height: int, width: int, tile: int | None = None) -> float:
    """What one upscale of a ``height x width`` image holds on the device at most: the weights, and the working set
    of the whole image or of one ``tile`` (with 16 px of context), whichever is smaller. For hosts that make room
    before a run (ComfyUI); the engine itself decides tiles by :func:`fits_untiled` and the ladder."""
    weights = sum(p.numel() for p in model.parameters()) * (torch.finfo(dtype).bits // 8)
    window = window_of(model)
    whole = (-(-height // window) * window) * (-(-width // window) * window)
    pixels = whole if not tile or tile <= 0 else min(whole, (tile + 16) ** 2)
    return float(weights + pixels * bytes_per_input_pixel(model, dtype))
