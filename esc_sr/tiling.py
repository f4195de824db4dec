"""Crop-overlap tiling, the fallback when not even an image's whole feature maps fit: each tile is run with real
image context around its core and only the core is kept; a first pass gathers the whole image's global pools.

(The default tiling is layer-streamed, in :mod:`esc_sr.engine` with :mod:`esc_runtime.streaming`; this module also
serves the arbitrary-scale LTE model and models that are not ESC.)
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Union

import torch
from torch import nn

from . import memory
from .errors import EngineError, OutOfMemory
from .memory import (
    AUTO_CPU_BUDGET_CAP, AUTO_MAX_TILE_ACCELERATOR, AUTO_MAX_TILE_CPU, AUTO_MEMORY_FRACTION, bytes_per_input_pixel,
    fits_untiled, is_out_of_memory, release_memory, window_of,
)

if TYPE_CHECKING:
    from .engine import _Runner

TileSpec = Union[Literal["auto"], int, None]

ProgressSpec = Union[bool, Callable[[int, int], None]]

# LR pixels of context kept around each tile (rounded up to the window). Measured with the golden
# fixtures' ESC x4 weights (upstream format, random values with every path active) on a photo with 64 px tiles (benchmarks/bench_seams.py): 32 px of
# context leave errors up to 5/255 at tile borders, 64 px at most 1/255. The context costs
# about (1 + 2*64/tile)^2 more work: 1.56x at 512 px tiles.
DEFAULT_OVERLAP = 64


def auto_tile_size(model: nn.Module, device: torch.device, dtype: torch.dtype, *, overlap: int = DEFAULT_OVERLAP) -> int:
    """The largest tile (LR pixels per side, a multiple of the window) that fits in free memory."""
    window = window_of(model)
    budget = memory.free_memory_bytes(device) * AUTO_MEMORY_FRACTION
    if device.type == "cpu":
        budget = min(budget, AUTO_CPU_BUDGET_CAP)
    per_pixel = bytes_per_input_pixel(model, dtype)
    context = 2 * context_pixels(overlap, window)
    side = int(math.sqrt(max(budget, 0) / per_pixel)) - context
    cap = AUTO_MAX_TILE_CPU if device.type == "cpu" else AUTO_MAX_TILE_ACCELERATOR
    side = min(side, cap)
    return max(window, side // window * window)


def context_pixels(overlap: int, window: int) -> int:
    return int(math.ceil(max(0, overlap) / window) * window)


# --------------------------------------------------------------------------------- global pooling


class _StatisticsCollected(Exception):
    """Raised from a hook to stop a statistics pass once the last global pool has been seen."""


class GlobalPooling:
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
                # Summed on the device (no host sync per pool and tile), in float64 where the device has it.
                wide = torch.float32 if box.device.type == "mps" else torch.float64
                pending[name] = (box.sum(dim=(-2, -1), dtype=wide), box.shape[-2] * box.shape[-1])
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


# ------------------------------------------------------------------------------------------ tiles


class TileProgress:
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


def tile_grid(height: int, width: int, core: int) -> list[tuple[int, int, int, int]]:
    return [
        (y, min(y + core, height), x, min(x + core, width))
        for y in range(0, height, core)
        for x in range(0, width, core)
    ]


def _covered(core: tuple[int, int, int, int], done: list[tuple[int, int, int, int]]) -> bool:
    y0, y1, x0, x1 = core
    return any(a <= y0 and y1 <= b and c <= x0 and x1 <= d for a, b, c, d in done)


def initial_core(runner: _Runner, tile: TileSpec, *, window: int, overlap: int, height: int, width: int) -> int:
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
    progress: TileProgress,
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
        grid = [c for c in tile_grid(height, width, core) if not _covered(c, done)]
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
        release_memory(runner.device)
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


def run_tiles(
    runner: _Runner,
    *,
    height: int,
    width: int,
    window: int,
    tile: TileSpec,
    overlap: int,
    progress: TileProgress,
    process: Callable[[tuple[int, int, int, int]], None],
) -> None:
    """Tile an image: a statistics pass first when global pools matter (see :class:`GlobalPooling`)."""
    core = initial_core(runner, tile, window=window, overlap=overlap, height=height, width=width)
    runner.pooling = GlobalPooling(runner.model)  # statistics belong to one image
    if runner.pooling.relevant and tile is not None and len(tile_grid(height, width, core)) == 1:
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
            runner.pooling = GlobalPooling(runner.model)
    if runner.pooling.relevant and len(tile_grid(height, width, core)) > 1:
        runner.pooling.mode = "collect"
        core = _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
                          progress=progress, core=core, process=process)
        runner.pooling.finish_collecting()
    _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
               progress=progress, core=core, process=process)
