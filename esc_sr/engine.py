"""The one inference engine: :func:`upscale` runs any ESC model on any image, of any size.

Used by the ``esc-sr`` command line, the ComfyUI nodes, the Spandrel call path and the benchmarks.

How an image goes through it
----------------------------
1. **Kinds.** A torch tensor (``NCHW`` or ``CHW`` float in [0, 1], RGB), a numpy array (``HxW``,
   ``HxWx1..4``; uint8, uint16 or float in [0, 1]) or a PIL image. The result has the same kind,
   layout and dtype as the input.
2. **Channels.** The models are RGB. Gray is replicated to RGB and the output averaged back to one
   channel (gray in, gray out). Alpha is upscaled separately: by default it goes through the same
   model as a gray image (sharp, model-quality edges; ``alpha='model'``), or with chainner-ext's
   Lanczos resize (``alpha='resize'``, faster). A fully opaque alpha is not run at all.
3. **Padding, the official way.** The LR image is reflect-padded on the right and bottom to a
   multiple of ``model.window_size`` and the output cropped back to ``h*scale x w*scale``: the
   evaluation protocol of the ESC paper, so benchmark PSNR matches it.
4. **Tiling.** Only when the image does not fit (or a ``tile`` is asked for). The tiles are cut on the window
   grid, and by default the model is **layer-streamed** (:mod:`esc_arch.streaming`): each stage of the network
   runs over every tile before the next stage starts, from whole LR feature maps kept in memory, so a tile needs
   only its stage's own radius of context, window attention none, and the dynamic kernels' global averages are
   taken over the whole map. The result is the untiled one up to float rounding, at a few percent more compute
   (``benchmarks/streamed_tiling.py``). When even the whole feature maps (a few ``dim``-channel LR maps) do not
   fit, the fallback is **crop-overlap** tiles: each core is run with ``overlap`` pixels of real image context on
   every side (rounded up to the window) and only its core is kept; a first pass over the tiles gathers the
   whole-image averages of the global pools and the output pass gives them to every tile
   (:class:`_GlobalPooling`). With the default overlap that output matches the untiled one within 1/255 on 8-bit
   output. The arbitrary-scale LTE model always tiles this way.
5. **Memory.** ``tile='auto'`` runs the image untiled whenever its estimated working set fits half the
   device's free memory (:func:`fits_untiled`): untiled is the fastest run. Otherwise it streams with the
   largest tile that fits beside the feature maps (fewest tiles), or, when the maps do not fit, picks the largest
   crop-overlap tile whose working memory fits (capped on CPU, where the OOM killer, not an error, answers an
   over-allocation). On out-of-memory (CUDA OOM, or a CPU allocation failure) an untiled run is retried with
   half-size tiles, streaming falls back to crop-overlap tiles, and a crop-overlap tile is halved and the remaining
   tiles redone (finished tiles are kept).
6. **Precision.** ``'auto'`` is fp16 on CUDA/MPS and fp32 on CPU; ``'fp16'``/``'bf16'`` are
   honoured where the device runs them. A half-precision tile that overflows to inf/NaN is
   recomputed in fp32.
7. **Scale.** ``outscale`` other than the model's scale: fixed-scale models run at their scale and
   the result is resized with chainner-ext (Lanczos); the arbitrary-scale ``ESCLTE`` model gets
   the factor itself.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Union

import numpy as np
import torch
from torch import nn

import esc_arch
from esc_arch import pad_to_multiple
from esc_arch.errors import ESCError
from esc_arch.streaming import TiledMaps, count_stages

__all__ = [
    "DEFAULT_OVERLAP",
    "EngineError",
    "OutOfMemory",
    "upscale",
    "prepare_model",
    "resolve_device",
    "resolve_precision",
    "auto_tile_size",
    "is_out_of_memory",
    "available_memory",
    "estimate_memory",
    "check_memory",
    "format_bytes",
]

TileSpec = Union[Literal["auto"], int, None]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
ProgressSpec = Union[bool, Callable[[int, int], None]]

# LR pixels of context kept around each tile (rounded up to the window). Measured with the golden
# fixtures' ESC x4 weights (upstream format, random values with every path active) on a photo with 64 px tiles (benchmarks/bench_seams.py): 32 px of
# context leave errors up to 5/255 at tile borders, 64 px at most 1/255. The context costs
# about (1 + 2*64/tile)^2 more work: 1.56x at 512 px tiles.
DEFAULT_OVERLAP = 64

# Upper bounds for the tiles of tile='auto' (when the image does not fit untiled).
_AUTO_MAX_TILE_CPU = 512
_AUTO_MAX_TILE_ACCELERATOR = 2048
# Fraction of free memory tile='auto' lets a tile use, and an absolute cap on CPU, where the
# kernel's OOM killer (not a catchable error) is what usually answers an over-allocation.
_AUTO_MEMORY_FRACTION = 0.5
_AUTO_CPU_BUDGET_CAP = 1 << 30


class EngineError(ESCError, RuntimeError):
    """A request the engine cannot carry out (bad argument, unsupported precision, ...)."""


class OutOfMemory(EngineError, MemoryError):
    """Out of memory even at the smallest tile, or with tiling disabled."""


# ------------------------------------------------------------------------------------------ devices


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None``: the model's device (CPU for a model without parameters); ``'auto'``: CUDA, else MPS,
    else CPU; anything else is passed to ``torch.device``."""
    if device is None:
        if model is not None:
            for tensor in model.parameters():
                return tensor.device
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but this torch build has no usable CUDA")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Map ``'auto' | 'fp32' | 'fp16' | 'bf16'`` to a dtype this device can run.

    ``'auto'`` is fp16 on CUDA and MPS (what users of such devices expect, and about twice as fast)
    and fp32 on CPU (CPU half-precision convolutions are slower than fp32 on most processors).
    """
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if precision not in names:
        raise EngineError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
    dtype = names[precision]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineError("this CUDA device does not support bf16; use --precision fp16 or fp32")
    if dtype == torch.bfloat16 and device.type == "mps":
        raise EngineError("bf16 is not supported on MPS; use fp16 or fp32")
    return dtype


def prepare_model(
    model: nn.Module, device: str | torch.device | None = None, precision: str = "auto"
) -> tuple[nn.Module, torch.device, torch.dtype]:
    """Return ``(model, device, dtype)``: the model on ``device`` in the precision's dtype, fused for inference.

    A model that is already fused, on the device and in the dtype is used as it is; otherwise a copy is prepared
    (:func:`esc_arch.fuse` bakes the ensembled kernel and attention biases once instead of in every tile), so the
    caller's model is left as it was. Call this once and pass the result to :func:`upscale` for many images (then
    :func:`upscale` has nothing to copy).
    """
    device = resolve_device(device, model)
    dtype = resolve_precision(precision, device)
    params = list(model.parameters())
    if params and all(p.device == device and p.dtype == dtype for p in params) and getattr(model, "is_fused", True):
        return model, device, dtype
    return esc_arch.fuse(copy.deepcopy(model).to(device=device, dtype=dtype)), device, dtype


# ------------------------------------------------------------------------------------ out of memory


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


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


# ---------------------------------------------------------------------------------------- auto tile


def _free_memory_bytes(device: torch.device) -> int:
    """Memory a tile may use on ``device``: free device memory, or available RAM on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory held by torch's caching allocator but unused is free for us too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    return _available_ram_bytes()


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
    """Bytes of RAM available now (``MemAvailable`` on Linux; psutil elsewhere; 4 GiB when unknown)."""
    return _available_ram_bytes()


MemorySpec = Union[Literal["auto"], int, None]


def _memory_limit(max_memory: MemorySpec) -> tuple[int | None, str]:
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


def _output_size(height: int, width: int, outscale: float) -> tuple[int, int]:
    return max(1, round(height * outscale)), max(1, round(width * outscale))


def estimate_memory(
    height: int, width: int, channels: int, model: nn.Module, *, outscale: float | None = None,
    bytes_per_sample: int = 1, alpha: str = "model",
) -> int:
    """Bytes one :func:`upscale` of a ``height x width x channels`` image needs besides the model and one tile:
    its float copies, the output canvas at the model's scale, the resized result when ``outscale`` differs from
    the model's scale, and the output in the input's sample size (``bytes_per_sample``: 1, 2 or 4), twice (the
    copy the caller encodes). Conservative: measured peaks stay below it."""
    arbitrary = _is_arbitrary_scale(model)
    native = None if arbitrary else int(model.scale)
    if outscale is None and arbitrary:
        raise EngineError("an arbitrary-scale model needs outscale (the upscaling factor)")
    outscale = float(native if outscale is None else outscale)
    colour = 3
    alpha_channels = 1 if channels in (2, 4) else 0
    in_px = height * width
    out_h, out_w = _output_size(height, width, outscale)
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
    limit, what = _memory_limit(max_memory)
    if limit is None:
        return
    need = batch * estimate_memory(height, width, channels, model, outscale=outscale, bytes_per_sample=bytes_per_sample,
                                   alpha=alpha)
    if need <= limit:
        return
    factor = float(int(model.scale) if outscale is None else outscale)
    out_h, out_w = _output_size(height, width, factor)
    images = f"a batch of {batch} {width}x{height} images" if batch > 1 else f"a {width}x{height} image"
    raise OutOfMemory(
        f"{images} upscaled x{factor:g} (to {out_w}x{out_h}) needs about {format_bytes(need)} of "
        f"memory, above {format_bytes(limit)} ({what}); refused before running the model "
        "(--max-memory, or upscale(max_memory=...), raises the limit)"
    )


def _bytes_per_input_pixel(model: nn.Module, dtype: torch.dtype) -> float:
    """Estimated peak working memory per LR pixel of a tile (activations, not weights).

    From the hyperparameters: the widest feature maps (about a dozen maps of ``dim`` channels alive
    at once, the qkv projection being 3*dim), the output (3*scale^2 values per LR pixel, in fp32),
    and, for the 'naive' attention kernel, the full window score matrix (window^2 values per head
    per pixel, twice for softmax). A conservative estimate: OOM halving catches the rest.
    """
    hyper = getattr(model, "hyperparameters", {}) or {}
    dim = int(hyper.get("dim", 64))
    mid = int(hyper.get("mid_dim", dim) or dim)
    width = max(dim, mid) * max(1.0, float(hyper.get("exp_ratio", 1.25)))
    scale = max(1, int(getattr(model, "scale", 4) or 4))
    element = torch.finfo(dtype).bits // 8
    per_pixel = element * 16 * width + 4 * 3 * scale * scale * 3
    if str(getattr(model, "attn_type", "")).lower() == "naive":
        window = int(getattr(model, "window_size", 32))
        heads = int(hyper.get("num_heads", 4))
        per_pixel += element * 2 * heads * window * window
    return float(per_pixel)


def auto_tile_size(model: nn.Module, device: torch.device, dtype: torch.dtype, *, overlap: int = DEFAULT_OVERLAP) -> int:
    """The largest tile (LR pixels per side, a multiple of the window) that fits in free memory."""
    window = _window_of(model)
    budget = _free_memory_bytes(device) * _AUTO_MEMORY_FRACTION
    if device.type == "cpu":
        budget = min(budget, _AUTO_CPU_BUDGET_CAP)
    per_pixel = _bytes_per_input_pixel(model, dtype)
    context = 2 * _context_pixels(overlap, window)
    side = int(math.sqrt(max(budget, 0) / per_pixel)) - context
    cap = _AUTO_MAX_TILE_CPU if device.type == "cpu" else _AUTO_MAX_TILE_ACCELERATOR
    side = min(side, cap)
    return max(window, side // window * window)


# ------------------------------------------------------------------------------------------ padding


def _window_of(model: nn.Module) -> int:
    return max(1, int(getattr(model, "window_size", 1) or 1))


def _context_pixels(overlap: int, window: int) -> int:
    return int(math.ceil(max(0, overlap) / window) * window)


# ------------------------------------------------------------------------------ global pooling


class _StatisticsCollected(Exception):
    """Raised from a hook to stop a statistics pass once the last global pool has been seen."""


class _GlobalPooling:
    """Makes every tile see the whole image's global average pools.

    ESC's convolutional attention predicts its dynamic 3x3 kernel from a global average pool of
    the features (``AdaptiveAvgPool2d(1)``). Run per tile, each tile would get its own kernel and
    the tiles would disagree at their borders whatever the overlap. So, when there is more than
    one tile, a first pass over the tiles accumulates each pool's input summed over the tile
    *cores* (which partition the image) into whole-image means, and the output pass replaces each
    pool's per-tile result by that mean: every tile then uses the same dynamic kernels, as the
    untiled run does. (In the first pass the pools of later layers see features computed with
    per-tile kernels of earlier layers, a second-order effect: measured < 1/255 on 8-bit output.)

    Pools are found by module name, so the hooks also apply to a copy of the model (the fp32
    fallback of a half-precision run). Pools whose predictor ends in an all-zero layer (untrained
    ESC: the upstream zero-init) cannot change the output and are ignored.
    """

    def __init__(self, model: nn.Module):
        self.names = [name for name in _global_pool_names(model) if not _pool_is_inert(model, name)]
        self.mode: str | None = None  # None | "collect" | "apply"
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.means: dict[str, torch.Tensor] = {}

    @property
    def relevant(self) -> bool:
        return bool(self.names)

    @contextmanager
    def hooks(self, model: nn.Module, core: tuple[int, int, int, int], tile_size: tuple[int, int]) -> Iterator[None]:
        """Install the hooks of the current mode on ``model`` for one tile.

        ``core`` is the kept box inside the tile (tile pixel coordinates), ``tile_size`` the tile's
        ``(height, width)``; feature maps at other resolutions (pixel-unshuffled trunks) are scaled.
        """
        if self.mode is None or not self.names:
            yield
            return
        handles = []
        pending: dict[str, tuple[torch.Tensor, int]] = {}
        last = self.names[-1]

        def collect(name: str):
            def hook(_module, args):
                x = args[0]
                fy, fx = x.shape[-2] / tile_size[0], x.shape[-1] / tile_size[1]
                y0, y1, x0, x1 = core
                box = x[..., round(y0 * fy) : round(y1 * fy), round(x0 * fx) : round(x1 * fx)]
                pending[name] = (box.double().sum(dim=(-2, -1)).cpu(), box.shape[-2] * box.shape[-1])
                if name == last:
                    raise _StatisticsCollected
            return hook

        def apply(name: str):
            def hook(_module, _args, output):
                return self.means[name].to(device=output.device, dtype=output.dtype).view_as(output)
            return hook

        try:
            for name in self.names:
                module = model.get_submodule(name)
                if self.mode == "collect":
                    handles.append(module.register_forward_pre_hook(collect(name)))
                else:
                    handles.append(module.register_forward_hook(apply(name)))
            try:
                yield
            except _StatisticsCollected:
                pass
            # Commit a tile's sums only once it has finished (an OOM mid-tile must not count twice).
            for name, (total, count) in pending.items():
                self._sums[name] = self._sums.get(name, 0) + total
                self._counts[name] = self._counts.get(name, 0) + count
        finally:
            for handle in handles:
                handle.remove()

    def finish_collecting(self) -> None:
        self.means = {name: (self._sums[name] / self._counts[name]).float() for name in self.names if name in self._sums}
        missing = [n for n in self.names if n not in self.means]
        if missing:  # a pool that never ran (unusual control flow): leave it per-tile
            self.names = [n for n in self.names if n in self.means]
        self.mode = "apply"


def _global_pool_names(model: nn.Module) -> list[str]:
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    ]


def _pool_is_inert(model: nn.Module, pool_name: str) -> bool:
    """True if the pool feeds an ``nn.Sequential`` whose last layer is all zeros (output constant)."""
    parent_name, _, index = pool_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or index != "0":
        return False
    last = parent[-1]
    if not isinstance(last, (nn.Conv2d, nn.Linear)):
        return False
    bias_zero = last.bias is None or not bool(last.bias.detach().any())
    return bias_zero and not bool(last.weight.detach().any())


# ------------------------------------------------------------------------------------------ running


@dataclass
class _Runner:
    """Runs the model on one LR tile; guards half precision against overflow; applies global pools."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    pooling: _GlobalPooling | None = None
    original: nn.Module | None = field(default=None, repr=False)  # the caller's model (fp32 source)
    _fp32_model: nn.Module | None = field(default=None, repr=False)
    _warned_overflow: bool = False

    def __post_init__(self) -> None:
        if self.pooling is None:
            self.pooling = _GlobalPooling(self.model)

    def __call__(self, tile: torch.Tensor, core: tuple[int, int, int, int] | None = None) -> torch.Tensor | None:
        """Model output for ``tile`` (float32, CPU); ``core``: the box of the tile that will be kept.

        In the statistics pass of :class:`_GlobalPooling` this returns None (no output needed).
        """
        core = core or (0, tile.shape[-2], 0, tile.shape[-1])
        out = self._forward(self.model, tile, self.dtype, core)
        if out is not None and self._overflowed(out):
            out = self._forward(self._fp32(), tile, torch.float32, core)
        return out

    def stream(self, image: torch.Tensor, maps: TiledMaps) -> torch.Tensor:
        """The model's output for the whole ``image``, layer-streamed over ``maps``' tiles (float32, CPU)."""
        out = self._guarded(self.model, lambda: self.model(image.to(device=self.device, dtype=self.dtype), maps))
        if self._overflowed(out):
            model = self._fp32()
            out = model(image.to(device=self.device, dtype=torch.float32), maps)
        return out.float().cpu()

    def _overflowed(self, out: torch.Tensor) -> bool:
        """fp16 can overflow inside the network on unusual content: then the work is redone in fp32."""
        if self.dtype == torch.float32 or bool(torch.isfinite(out).all()):
            return False
        if not self._warned_overflow:
            warnings.warn("half-precision overflow; recomputing it in fp32", RuntimeWarning, stacklevel=4)
            self._warned_overflow = True
        return True

    def _fp32(self) -> nn.Module:
        if self._fp32_model is None:  # from the caller's weights, not a round trip through fp16
            source = self.original if self.original is not None else self.model
            self._fp32_model = esc_arch.fuse(copy.deepcopy(source).to(device=self.device, dtype=torch.float32))
        return self._fp32_model

    def call(self, model: nn.Module, fn: Callable[[], torch.Tensor], core, tile_size) -> torch.Tensor | None:
        """Run ``fn()`` (which calls ``model``) with the global-pool hooks for one tile."""
        result = None
        with self.pooling.hooks(model, core, tile_size):
            result = fn()
        return result if self.pooling.mode != "collect" else None

    def _forward(self, model: nn.Module, tile: torch.Tensor, dtype: torch.dtype, core) -> torch.Tensor | None:
        size = tuple(tile.shape[-2:])
        out = self._guarded(model, lambda: self.call(model, lambda: model(tile.to(device=self.device, dtype=dtype)), core, size))
        return None if out is None else out.float().cpu()

    def _guarded(self, model: nn.Module, fn: Callable[[], Any]) -> Any:
        """``fn()``, with torch's "not implemented for 'Half'" turned into a one-line EngineError."""
        try:
            return fn()
        except RuntimeError as exc:
            text = str(exc)
            dtype = next(model.parameters()).dtype
            if dtype != torch.float32 and ("not implemented for" in text and ("Half" in text or "BFloat16" in text)):
                name = "fp16" if dtype == torch.float16 else "bf16"
                raise EngineError(
                    f"{name} is not supported on {self.device.type} for this model ({text.splitlines()[0]}); "
                    "use precision fp32"
                ) from exc
            raise


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _TileProgress:
    """A tqdm bar over tiles, a user callback ``(done, total)``, or nothing."""

    def __init__(self, spec: ProgressSpec):
        self._callback = spec if callable(spec) else None
        self._enabled = bool(spec) and not callable(spec)
        self._bar = None
        self.done = 0
        self.total = 0

    def start(self, total: int) -> None:
        self.done, self.total = 0, total
        if self._enabled and total > 1:
            from tqdm.auto import tqdm

            if self._bar is None:
                self._bar = tqdm(total=total, desc="tiles", unit="tile", leave=False, dynamic_ncols=True)
            else:
                self._bar.reset(total=total)
        self._report()

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        self._report()

    def _report(self) -> None:
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _tile_grid(height: int, width: int, core: int) -> list[tuple[int, int, int, int]]:
    return [
        (y, min(y + core, height), x, min(x + core, width))
        for y in range(0, height, core)
        for x in range(0, width, core)
    ]


def _covered(core: tuple[int, int, int, int], done: list[tuple[int, int, int, int]]) -> bool:
    y0, y1, x0, x1 = core
    return any(a <= y0 and y1 <= b and c <= x0 and x1 <= d for a, b, c, d in done)


def fits_untiled(model: nn.Module, device: torch.device, dtype: torch.dtype, height: int, width: int) -> bool:
    """Whether the untiled working set of a ``height x width`` LR image fits the memory free on ``device`` (with
    the auto-tiling margin). Untiled is the fastest way to run an image: no context is computed twice and the
    global pools need no statistics pass. The estimate per pixel is conservative: measured peaks on CPU were
    0.46x (the default model) and 0.51-0.56x (ESC x4) of it."""
    window = _window_of(model)
    pixels = (-(-height // window) * window) * (-(-width // window) * window)
    return pixels * _bytes_per_input_pixel(model, dtype) <= _free_memory_bytes(device) * _AUTO_MEMORY_FRACTION


def _initial_core(runner: _Runner, tile: TileSpec, *, window: int, overlap: int, height: int, width: int) -> int:
    if tile == "auto" and fits_untiled(runner.model, runner.device, runner.dtype, height, width):
        core = max(height, width)
    elif tile == "auto":
        core = auto_tile_size(runner.model, runner.device, runner.dtype, overlap=overlap)
    elif tile is None:
        core = max(height, width)
    else:
        if int(tile) <= 0:
            raise EngineError("tile must be a positive size, 'auto', or None to disable tiling")
        core = max(window, int(tile) // window * window)
    # A tile covering the whole image is the untiled run.
    return min(core, -(-max(height, width) // window) * window)


def _tile_loop(
    runner: _Runner,
    *,
    height: int,
    width: int,
    window: int,
    tile: TileSpec,
    overlap: int,
    progress: _TileProgress,
    core: int,
    process: Callable[[tuple[int, int, int, int]], None],
) -> int:
    """Call ``process(box)`` for every ``core``-sized box of a ``height x width`` grid; returns the
    core size finally used (smaller than asked after out-of-memory halving).

    Cores are ``(y0, y1, x0, x1)`` LR boxes on the window grid. After an OOM the tile is halved
    and only the cores not inside an already finished core are redone (halving a multiple of
    the window refines the grid, so finished work is kept).
    """
    done: list[tuple[int, int, int, int]] = []
    while True:
        grid = [c for c in _tile_grid(height, width, core) if not _covered(c, done)]
        progress.start(len(grid))
        try:
            for box in grid:
                process(box)
                done.append(box)
                progress.advance()
            return core
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Outside the except block, so the traceback (and the tensors it holds) is released first.
        _release_memory(runner.device)
        if tile is None:
            raise OutOfMemory(
                f"out of memory upscaling a {width}x{height} image without tiling on {runner.device}; "
                "enable tiling (tile='auto' or a tile size)"
            )
        if core <= window:
            raise OutOfMemory(f"out of memory even with the smallest tile ({window}x{window} px) on {runner.device}")
        smaller = max(window, core // 2 // window * window)
        warnings.warn(f"out of memory with {core}px tiles; retrying with {smaller}px tiles", RuntimeWarning, stacklevel=3)
        core = smaller


def _run_tiles(
    runner: _Runner,
    *,
    height: int,
    width: int,
    window: int,
    tile: TileSpec,
    overlap: int,
    progress: _TileProgress,
    process: Callable[[tuple[int, int, int, int]], None],
) -> None:
    """Tile an image: a statistics pass first when global pools matter (see :class:`_GlobalPooling`)."""
    core = _initial_core(runner, tile, window=window, overlap=overlap, height=height, width=width)
    runner.pooling = _GlobalPooling(runner.model)  # statistics belong to one image
    if runner.pooling.relevant and tile is not None and len(_tile_grid(height, width, core)) == 1:
        # Untiled first (tile='auto' on an image that fits). If that runs out of memory, the tiles that replace it
        # need the statistics pass, so the halving happens here rather than inside the loop.
        try:
            _tile_loop(runner, height=height, width=width, window=window, tile=None, overlap=overlap,
                       progress=progress, core=core, process=process)
            return
        except OutOfMemory:
            smaller = max(window, core // 2 // window * window)
            warnings.warn(f"out of memory untiled; retrying with {smaller}px tiles", RuntimeWarning, stacklevel=2)
            core = smaller
            runner.pooling = _GlobalPooling(runner.model)
    if runner.pooling.relevant and len(_tile_grid(height, width, core)) > 1:
        runner.pooling.mode = "collect"
        core = _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
                          progress=progress, core=core, process=process)
        runner.pooling.finish_collecting()
    _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
               progress=progress, core=core, process=process)


def _run_fixed_scale(
    runner: _Runner, lr: torch.Tensor, *, scale: int, window: int, tile: TileSpec, overlap: int,
    progress: _TileProgress,
) -> torch.Tensor:
    """Upscale one ``(1, 3, h, w)`` float32 CPU image with a fixed-scale model; returns ``(1, 3, h*s, w*s)``.

    Untiled when it fits (or ``tile`` is None); else layer-streamed over tiles when the whole feature maps fit
    (exact, no context recomputed); else crop-overlap tiles with a statistics pass."""
    h, w = lr.shape[-2:]
    padded = pad_to_multiple(lr, window)
    ph, pw = padded.shape[-2:]
    context = _context_pixels(overlap, window)
    out = torch.empty((1, 3, h * scale, w * scale), dtype=torch.float32)

    def process(box: tuple[int, int, int, int]) -> None:
        y0, y1, x0, x1 = box
        iy0, iy1 = max(0, y0 - context), min(ph, y1 + context)
        ix0, ix1 = max(0, x0 - context), min(pw, x1 + context)
        result = runner(padded[..., iy0:iy1, ix0:ix1], (y0 - iy0, y1 - iy0, x0 - ix0, x1 - ix0))
        if result is None:  # statistics pass
            return
        expected = ((iy1 - iy0) * scale, (ix1 - ix0) * scale)
        if tuple(result.shape[-2:]) != expected:
            raise EngineError(
                f"the model returned {tuple(result.shape[-2:])} for a {(iy1 - iy0, ix1 - ix0)} input, "
                f"not x{scale} as its .scale says"
            )
        # Keep the core, cropped to the real (unpadded) image.
        oy1, ox1 = min(y1, h), min(x1, w)
        if oy1 > y0 and ox1 > x0:
            out[..., y0 * scale : oy1 * scale, x0 * scale : ox1 * scale] = result[
                ..., (y0 - iy0) * scale : (oy1 - iy0) * scale, (x0 - ix0) * scale : (ox1 - ix0) * scale
            ]

    if tile is not None and _streams(runner.model):
        core = _initial_core(runner, tile, window=window, overlap=overlap, height=ph, width=pw)
        if len(_tile_grid(ph, pw, core)) == 1:
            try:
                _run_tiles(runner, height=ph, width=pw, window=window, tile=None, overlap=overlap, progress=progress,
                           process=process)
                return out
            except OutOfMemory:
                core = tile = max(window, core // 2 // window * window)
                warnings.warn(f"out of memory untiled; retrying with {core}px tiles", RuntimeWarning, stacklevel=2)
        stream_tile = _stream_tile(runner, tile, core, ph, pw)
        if stream_tile is not None:
            try:
                progress.start(count_stages(runner.model))
                result = runner.stream(padded, TiledMaps(stream_tile, window=window, on_stage=progress.advance))
                out.copy_(result[..., : h * scale, : w * scale])
                return out
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            _release_memory(runner.device)
            warnings.warn("out of memory streaming the feature maps; retrying with overlapping tiles", RuntimeWarning,
                          stacklevel=2)
        tile = core
    _run_tiles(runner, height=ph, width=pw, window=window, tile=tile, overlap=overlap, progress=progress, process=process)
    return out


# ------------------------------------------------------------------------------------ layer streaming


def _streams(model: nn.Module) -> bool:
    """Models whose forward pass can be layer-streamed (:mod:`esc_arch.streaming`): every fixed-scale ESC model."""
    return isinstance(model, esc_arch.ESCModelBase) and not model.arbitrary_scale


def _streamed_map_bytes(model: nn.Module, dtype: torch.dtype, height: int, width: int) -> float:
    """Memory the whole feature maps of a layer-streamed ``height x width`` run hold: at most five ``dim``-channel
    maps alive at once (the stem, a block's input, its running sum, an FFN output, the next sum), the input, and the
    output at the model's scale (plus its float32 copy)."""
    element = torch.finfo(dtype).bits // 8
    dim = int(model.hyperparameters.get("dim", 64))
    outputs = 3 * float(model.scale) ** 2
    return height * width * (element * (5 * dim + 3 + outputs) + (4 * outputs if element != 4 else 0))


def _stream_tile(runner: _Runner, tile: TileSpec, core: int, height: int, width: int) -> int | None:
    """The tile to stream with, or None when the whole maps plus one such tile do not fit (in half the free memory).

    ``tile='auto'``: the largest tile that fits beside the maps (fewest tiles), up to the auto-tiling caps."""
    model, device, dtype = runner.model, runner.device, runner.dtype
    window = _window_of(model)
    budget = _free_memory_bytes(device) * _AUTO_MEMORY_FRACTION - _streamed_map_bytes(model, dtype, height, width)
    # A stage's tile carries at most its radius of context (8 px: the real-world heads); 16 covers it.
    per_side = lambda side: (side + 16) ** 2 * _bytes_per_input_pixel(model, dtype)  # noqa: E731
    if tile == "auto":
        cap = _AUTO_MAX_TILE_CPU if device.type == "cpu" else _AUTO_MAX_TILE_ACCELERATOR
        side = min(cap, int(math.sqrt(max(budget, 0) / _bytes_per_input_pixel(model, dtype))) - 16)
        core = side // window * window
    if core < window or per_side(core) > budget:
        return None
    return core


def _is_arbitrary_scale(model: nn.Module) -> bool:
    return getattr(model, "arbitrary_scale", False)


def _output_centres(out_size: int, in_size: int) -> np.ndarray:
    """LR-pixel positions (0 = top/left edge) of the centres of ``out_size`` output pixels."""
    return (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)


def _run_arbitrary_scale(
    runner: _Runner, lr: torch.Tensor, *, factor: float, window: int, tile: TileSpec, overlap: int,
    progress: _TileProgress, max_queries: int = 16384,
) -> torch.Tensor:
    """ESCLTE: the factor goes to the model.

    Tiles cut the LR encoder input (no model-level padding: the upstream LTE protocol feeds the
    image as is). Each tile decodes exactly the output pixels whose centres fall in its core,
    with query coordinates and cells re-expressed in the tile's own [-1, 1] frame; every term of
    the LTE decoder (half-pixel shifts, relative coordinates, cells, the bilinear skip) is
    measured in LR pixels, so this equals the whole-image decode up to encoder context, which
    ``overlap`` supplies.
    """
    model = runner.model
    h, w = lr.shape[-2:]
    out_h, out_w = max(1, round(h * factor)), max(1, round(w * factor))
    cell = np.array(model.query_cell((h, w), (out_h, out_w)))
    centre_y, centre_x = _output_centres(out_h, h), _output_centres(out_w, w)
    context = _context_pixels(overlap, window)
    out = torch.empty((1, 3, out_h, out_w), dtype=torch.float32)

    def process(box: tuple[int, int, int, int]) -> None:
        y0, y1, x0, x1 = box
        ry = np.searchsorted(centre_y, [y0, y1], side="left")
        rx = np.searchsorted(centre_x, [x0, x1], side="left")
        empty = ry[1] <= ry[0] or rx[1] <= rx[0]  # possible when factor < 1
        if empty and runner.pooling.mode != "collect":
            return
        iy0, iy1 = max(0, y0 - context), min(h, y1 + context)
        ix0, ix1 = max(0, x0 - context), min(w, x1 + context)
        th, tw = iy1 - iy0, ix1 - ix0
        ys = -1 + 2 * (centre_y[ry[0] : ry[1]] - iy0) / th
        xs = -1 + 2 * (centre_x[rx[0] : rx[1]] - ix0) / tw
        grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        coord = torch.from_numpy(grid).to(runner.device, runner.dtype)[None]
        tile_cell = torch.tensor([cell[0] * h / th, cell[1] * w / tw], device=runner.device, dtype=runner.dtype)
        tile_lr = lr[..., iy0:iy1, ix0:ix1].to(runner.device, runner.dtype)
        core_in_tile = (y0 - iy0, y1 - iy0, x0 - ix0, x1 - ix0)
        encoded = runner.call(model, lambda: model.encode(tile_lr), core_in_tile, (th, tw))
        if encoded is None or empty:  # statistics pass, or nothing to decode here
            return
        rgb = torch.cat(
            [
                model.query(encoded, coord[:, s : s + max_queries], tile_cell.expand(1, min(max_queries, coord.shape[1] - s), 2))
                for s in range(0, coord.shape[1], max_queries)
            ],
            dim=1,
        )
        rows, cols = ry[1] - ry[0], rx[1] - rx[0]
        out[..., ry[0] : ry[1], rx[0] : rx[1]] = rgb.float().cpu().transpose(1, 2).reshape(1, 3, rows, cols)

    _run_tiles(runner, height=h, width=w, window=window, tile=tile, overlap=overlap, progress=progress, process=process)
    return out


# ------------------------------------------------------------------------------------- kinds/layout


@dataclass
class _Planes:
    """An image as ``(1, C, H, W)`` float32 planes plus what is needed to give it back as it came."""

    planes: list[torch.Tensor]  # one (1, C, H, W) tensor per batch item
    restore: Callable[[list[torch.Tensor]], Any]


def _from_tensor(image: torch.Tensor) -> _Planes:
    if image.ndim not in (3, 4):
        raise EngineError(f"expected an NCHW or CHW tensor, got shape {tuple(image.shape)}")
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    if x.shape[1] not in (1, 2, 3, 4):
        raise EngineError(f"expected 1-4 channels (gray, gray+alpha, RGB, RGBA), got {x.shape[1]}")
    if not torch.is_floating_point(x):
        raise EngineError(f"expected a float tensor in [0, 1], got {x.dtype}")
    device, dtype = image.device, image.dtype
    planes = [_finite_input(x[i : i + 1].detach().to("cpu", torch.float32)) for i in range(x.shape[0])]

    def restore(outs: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(outs, 0).to(device=device, dtype=dtype)
        return y if batched else y[0]

    return _Planes(planes, restore)


def _from_numpy(image: np.ndarray) -> _Planes:
    from . import images

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise EngineError(f"expected an HxW or HxWxC (C = 1..4) array, got shape {image.shape}")
    dtype = image.dtype
    try:
        values = images.to_float(image)
    except TypeError as exc:
        raise EngineError(str(exc)) from None
    layout_2d = image.ndim == 2
    hwc = values[:, :, None] if layout_2d else values
    planes = [_finite_input(torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None])]

    def restore(outs: list[torch.Tensor]) -> np.ndarray:
        result = outs[0][0].numpy().transpose(1, 2, 0)  # a view of the engine's own output canvas
        if layout_2d:
            result = result[:, :, 0]
        return np.ascontiguousarray(images.from_float(result, dtype, inplace=True))

    return _Planes(planes, restore)


def _finite_input(planes: torch.Tensor) -> torch.Tensor:
    """Input pixels as the model can take them: NaN and -Inf become 0, +Inf becomes 1, with a warning.

    One NaN would spread through every window and layer it touches (the whole output, past the first global
    average), and a float TIFF can hold them; the documented choice is to clamp them, as out-of-range values are
    clamped, and say so."""
    if not planes.is_floating_point() or bool(torch.isfinite(planes).all()):
        return planes
    bad = int((~torch.isfinite(planes)).sum())
    warnings.warn(
        f"the image has {bad:,} non-finite pixel value{'s' * (bad != 1)} (NaN or Inf); replaced: NaN and -Inf by 0, "
        "+Inf by 1", RuntimeWarning, stacklevel=4,
    )
    return torch.nan_to_num(planes, nan=0.0, posinf=1.0, neginf=0.0)


def _from_pil(image: Any) -> _Planes:
    from . import images

    inner = _from_numpy(images.pil_to_array(image))
    return _Planes(inner.planes, lambda outs: images.array_to_pil(inner.restore(outs)))


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image as PILImage
    except ImportError:
        return False
    return isinstance(image, PILImage.Image)


# ------------------------------------------------------------------------------------------ upscale


def upscale(
    model: nn.Module,
    image: Any,
    *,
    outscale: float | None = None,
    tile: TileSpec = "auto",
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    precision: str = "auto",
    alpha: Literal["model", "resize"] = "model",
    progress: ProgressSpec = False,
    max_memory: MemorySpec = "auto",
) -> Any:
    """Upscale ``image`` with ``model``; see the module docstring for the full behaviour.

    Args:
        model: an esc_arch image model (``.scale``, ``.window_size``), or an ``ESCLTE``.
        image: ``NCHW``/``CHW`` float tensor in [0, 1] (RGB), numpy ``HxW``/``HxWxC`` (uint8,
            uint16 or float), or a PIL image. Gray, gray+alpha, RGB and RGBA are accepted.
        outscale: output/input size ratio; default: the model's scale (``ESCLTE``: required).
        tile: LR tile side in pixels (rounded down to a multiple of the window), ``'auto'``
            (untiled when the image fits in free memory, else tiles sized from it), or ``None`` to run the
            whole image at once.
        overlap: LR pixels of context around each crop-overlap tile (rounded up to the window); layer-streamed
            tiles need none.
        device: ``None`` (the model's device), ``'auto'``, or a torch device string.
        precision: ``'auto'`` (fp16 on CUDA/MPS, fp32 on CPU), ``'fp32'``, ``'fp16'`` or ``'bf16'``.
        alpha: how alpha is upscaled: ``'model'`` (as a gray image through the model) or
            ``'resize'`` (chainner-ext Lanczos).
        progress: ``True`` for a tqdm bar over tiles, or a callback ``(done, total)``.
        max_memory: the memory the image's copies and output may take (:func:`estimate_memory`): ``'auto'`` (the
            RAM available now), a number of bytes, or None (no check). A larger job is refused before the model
            runs, instead of failing (or being killed) when its output is allocated.

    Non-finite input values (NaN, Inf: possible in float images) are replaced, NaN and -Inf by 0 and +Inf by 1,
    with a ``RuntimeWarning``. A non-finite output is never returned: it raises :class:`EngineError`.

    Returns:
        The upscaled image, of the same kind, channel layout and dtype as ``image``.

    Raises:
        EngineError: a bad argument, an empty image, an unsupported precision on this device, or a non-finite
            output.
        OutOfMemory: the job needs more than ``max_memory``; out of memory with tiling disabled, or even at the
            smallest tile.
    """
    if alpha not in ("model", "resize"):
        raise EngineError(f"alpha must be 'model' or 'resize', not {alpha!r}")
    if overlap < 0:
        raise EngineError("overlap must be >= 0")
    if isinstance(tile, bool) or (tile is not None and tile != "auto" and not isinstance(tile, int)):
        raise EngineError(f"tile must be 'auto', a positive int or None, not {tile!r}")

    arbitrary = _is_arbitrary_scale(model)
    native = None if arbitrary else int(model.scale)
    if outscale is None:
        if arbitrary:
            raise EngineError("an arbitrary-scale model needs outscale (the upscaling factor)")
        outscale = float(native)
    if isinstance(outscale, bool) or not isinstance(outscale, (int, float)) or not (outscale > 0 and math.isfinite(outscale)):
        raise EngineError(f"outscale must be a positive number, not {outscale!r}")

    height, width, channels, batch, sample_bytes = _geometry(image)
    if batch == 0:
        raise EngineError("the batch is empty (0 images): nothing to upscale")
    if height == 0 or width == 0:
        raise EngineError(f"the image has no pixels ({width}x{height}): nothing to upscale")
    check_memory(height, width, channels, model, outscale=outscale, bytes_per_sample=sample_bytes, alpha=alpha,
                 max_memory=max_memory, batch=batch)

    if isinstance(image, torch.Tensor):
        kind = _from_tensor(image)
    elif isinstance(image, np.ndarray):
        kind = _from_numpy(image)
    elif _is_pil(image):
        kind = _from_pil(image)
    else:
        raise EngineError(f"unsupported image type {type(image).__name__}: use a torch tensor, numpy array or PIL image")

    if precision == "auto" and not getattr(model, "supports_half", True):
        precision = "fp32"  # e.g. LTE: its query coordinates need more than fp16's 11 bits of mantissa
    prepared, run_device, dtype = prepare_model(model, device, precision)
    runner = _Runner(prepared, run_device, dtype, original=model)
    window = _window_of(prepared)
    bar = _TileProgress(progress)

    def run_rgb(rgb: torch.Tensor) -> torch.Tensor:
        if arbitrary:
            return _run_arbitrary_scale(runner, rgb, factor=outscale, window=window, tile=tile, overlap=overlap, progress=bar)
        out = _run_fixed_scale(runner, rgb, scale=native, window=window, tile=tile, overlap=overlap, progress=bar)
        if outscale == native:
            return out
        return _resize_planes(out.clamp_(0.0, 1.0), _target_size(rgb, outscale))  # resize the image, not overshoot

    def run_gray(gray: torch.Tensor) -> torch.Tensor:
        return run_rgb(gray.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)

    def run_alpha(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if bool((a >= 1.0).all()):
            return torch.ones((1, 1, size[0], size[1]), dtype=torch.float32)
        if alpha == "resize":
            return _resize_planes(a, size)
        out = run_gray(a)
        return out if tuple(out.shape[-2:]) == size else _resize_planes(out, size)

    outs = []
    with _eval_mode(prepared), torch.inference_mode():
        try:
            for x in kind.planes:
                channels = x.shape[1]
                if channels == 3:
                    y = run_rgb(x)
                elif channels == 1:
                    y = run_gray(x)
                else:
                    color = run_rgb(x[:, :3]) if channels == 4 else run_gray(x[:, :1])
                    a = run_alpha(x[:, channels - 1 :], tuple(color.shape[-2:]))
                    y = torch.cat([color, a], 1)
                if not bool(torch.isfinite(y).all()):
                    bad = int((~torch.isfinite(y)).sum())
                    raise EngineError(
                        f"the model's output has {bad:,} non-finite values (NaN or Inf) of {y.numel():,}: the weights "
                        "or this image's values overflow; no output is returned"
                    )
                outs.append(y.clamp_(0.0, 1.0))
        finally:
            bar.close()
    return kind.restore(outs)


def _geometry(image: Any) -> tuple[int, int, int, int, int]:
    """``(height, width, channels, batch, bytes per sample)`` of an image of any kind, read from its shape alone
    (unrecognised kinds and layouts give zeros here and are reported by the conversion)."""
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.ndim == 3:
            shape = (1, *shape)
        if len(shape) != 4:
            return 1, 1, 3, 1, 4
        return shape[2], shape[3], shape[1], shape[0], 4
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            return 1, 1, 3, 1, 1
        channels = 1 if image.ndim == 2 else image.shape[2]
        return image.shape[0], image.shape[1], channels, 1, max(1, min(4, image.dtype.itemsize))
    if _is_pil(image):
        width, height = image.size
        return height, width, max(1, min(4, len(image.getbands()))), 1, 1 if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else 4
    return 1, 1, 3, 1, 1


def _target_size(lr: torch.Tensor, outscale: float) -> tuple[int, int]:
    h, w = lr.shape[-2:]
    return max(1, round(h * outscale)), max(1, round(w * outscale))


def _resize_planes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(1, C, H, W)`` float32 CPU planes to ``size = (H', W')`` with chainner-ext Lanczos."""
    from . import images

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    hwc = x[0].permute(1, 2, 0).contiguous().numpy()
    out = images.resize(hwc, (size[1], size[0]))
    if out.ndim == 2:
        out = out[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None]
