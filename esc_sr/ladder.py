"""The execution ladder, and the one owner of out-of-memory handling: an image runs on the first rung that fits.

1. **Untiled**, when the estimate says the whole pass fits (or tiling is off): the fastest run.
2. **Layer-streamed** tiles (:mod:`esc_runtime.streaming`), when the whole LR feature maps and one tile fit beside
   them: exact, no context recomputed. Out of memory untiled halves the tile first.
3. **Crop-overlap** tiles, when not even the whole feature maps fit (or streaming ran out of memory, or the model is
   not an ESC model): each tile with real image context, a statistics pass for the global pools
   (:class:`esc_sr.tiling.GlobalPooling`), and halved on out-of-memory, keeping the tiles already finished.

Every out-of-memory error of a run is caught here and nowhere else; each step down says so in one warning.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from esc_runtime import TiledMaps, count_stages

from . import memory
from .errors import EngineError, ImageWarning, OutOfMemory
from .memory import (
    AUTO_MAX_TILE_ACCELERATOR, AUTO_MAX_TILE_CPU, AUTO_MEMORY_FRACTION, bytes_per_input_pixel, fits_untiled,
    is_out_of_memory, release_memory, streamed_map_bytes, window_of,
)
from .runner import Runner
from .tiling import GlobalPooling, TileProgress, TileSpec, auto_tile_size, tile_grid

Box = tuple[int, int, int, int]


def run(
    runner: Runner, tile: TileSpec, *, height: int, width: int, window: int, overlap: int, progress: TileProgress,
    process: Callable[[Box], None], stream: Callable[[TiledMaps], None] | None, outscale: float | None = None,
) -> None:
    """Run a ``height x width`` LR image on the first rung that fits: ``process(box)`` computes and keeps one
    crop-overlap box (the whole image, untiled), ``stream(maps)`` the whole image layer-streamed (None: the model
    cannot stream). When the last rung fails too, the host's ``make_room`` (if any) is asked once and the ladder
    climbed again."""
    rungs = dict(height=height, width=width, window=window, overlap=overlap, progress=progress, process=process,
                 stream=stream, outscale=outscale)
    try:
        _climb(runner, tile, **rungs)
    except OutOfMemory:
        if runner.make_room is None:
            raise
        warnings.warn(f"out of memory on {runner.device} on every rung; asking the host to free memory and retrying",
                      ImageWarning, stacklevel=3)
        runner.make_room()
        release_memory(runner.device)
        _climb(runner, tile, **rungs)


def _climb(
    runner: Runner, tile: TileSpec, *, height: int, width: int, window: int, overlap: int, progress: TileProgress,
    process: Callable[[Box], None], stream: Callable[[TiledMaps], None] | None, outscale: float | None,
) -> None:
    core = initial_core(runner, tile, window=window, overlap=overlap, height=height, width=width)
    runner.pooling = GlobalPooling(runner.model)  # statistics belong to one image
    if len(tile_grid(height, width, core)) == 1:
        try:
            _tile_loop(runner, height=height, width=width, window=window, tile=None, overlap=overlap,
                       progress=progress, core=core, process=process)
            return
        except OutOfMemory:
            if tile is None:
                raise
            core = tile = _halved(core, window)
            warnings.warn(f"out of memory untiled; retrying with {core}px tiles", ImageWarning, stacklevel=3)
    if stream is not None and tile is not None:
        stream_tile = _stream_tile(runner, tile, core, height, width, outscale)
        if stream_tile is not None:
            try:
                progress.start(count_stages(runner.model))
                stream(TiledMaps(stream_tile, window=window, on_stage=progress.advance))
                return
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            release_memory(runner.device)
            warnings.warn("out of memory streaming the feature maps; retrying with overlapping tiles",
                          ImageWarning, stacklevel=3)
    if runner.pooling.relevant and len(tile_grid(height, width, core)) > 1:
        runner.pooling.mode = "collect"  # crop-overlap tiles: the statistics pass first
        core = _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
                          progress=progress, core=core, process=process)
        runner.pooling.finish_collecting()
    _tile_loop(runner, height=height, width=width, window=window, tile=tile, overlap=overlap,
               progress=progress, core=core, process=process)


def _halved(core: int, window: int) -> int:
    return max(window, core // 2 // window * window)


def _stream_tile(
    runner: Runner, tile: TileSpec, core: int, height: int, width: int, outscale: float | None = None
) -> int | None:
    """The tile to stream with, or None when the whole maps plus one such tile do not fit (in half the free memory).

    ``tile='auto'``: the largest tile that fits beside the maps (fewest tiles), up to the auto-tiling caps."""
    model, device, dtype = runner.model, runner.device, runner.dtype
    window = window_of(model)
    maps = streamed_map_bytes(model, dtype, height, width, outscale=outscale)
    budget = memory.free_memory_bytes(device) * AUTO_MEMORY_FRACTION - maps
    # A stage's tile carries at most its radius of context (8 px: the real-world heads); 16 covers it.
    per_side = lambda side: (side + 16) ** 2 * bytes_per_input_pixel(model, dtype)  # noqa: E731
    if tile == "auto":
        cap = AUTO_MAX_TILE_CPU if device.type == "cpu" else AUTO_MAX_TILE_ACCELERATOR
        side = min(cap, int(math.sqrt(max(budget, 0) / bytes_per_input_pixel(model, dtype))) - 16)
        core = side // window * window
    if core < window or per_side(core) > budget:
        return None
    return core


def initial_core(runner: Runner, tile: TileSpec, *, window: int, overlap: int, height: int, width: int) -> int:
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


def _covered(core: tuple[int, int, int, int], done: list[tuple[int, int, int, int]]) -> bool:
    y0, y1, x0, x1 = core
    return any(a <= y0 and y1 <= b and c <= x0 and x1 <= d for a, b, c, d in done)


def _tile_loop(
    runner: Runner,
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
        smaller = _halved(core, window)
        warnings.warn(f"out of memory with {core}px tiles; retrying with {smaller}px tiles", ImageWarning, stacklevel=3)
        core = smaller
