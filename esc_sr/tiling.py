"""Crop-overlap tiling, the fallback when not even an image's whole feature maps fit: each tile is run with real
image context around its core and only the core is kept; a first pass gathers the whole image's global pools.

Which of untiled, layer-streamed and crop-overlap runs an image is :mod:`esc_sr.ladder`'s decision; this module
holds the crop-overlap tiles' geometry, their global-pool statistics and the progress over tiles.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Union

import torch
from torch import nn

from . import memory
from .memory import (
    AUTO_CPU_BUDGET_CAP, AUTO_MAX_TILE_ACCELERATOR, AUTO_MAX_TILE_CPU, AUTO_MEMORY_FRACTION, bytes_per_input_pixel,
    window_of,
)

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

    Pools are found by module name, so the same statistics apply to a copy of the model (the fp32
    fallback of a half-precision run). Each tile runs a view of the model (:meth:`view`): no hook is put on the
    model, which other threads may be running. Pools whose predictor ends in an all-zero layer (untrained
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
    def view(self, model: nn.Module, core: tuple[int, int, int, int], tile_size: tuple[int, int]) -> Iterator[nn.Module]:
        """The module to run one tile with: ``model`` itself outside crop-overlap tiling, else a view of it whose
        global pools collect (statistics pass) or return (output pass) the whole image's means.

        The view shares every parameter with ``model`` but owns the path of modules down to each pool, so ``model``
        is never changed: calls on it from other threads (untiled, streamed, or tiled with their own statistics)
        see nothing of this one. ``core`` is the kept box inside the tile (tile pixel coordinates), ``tile_size``
        the tile's ``(height, width)``; feature maps at other resolutions (pixel-unshuffled trunks) are scaled.
        """
        if self.mode is None or not self.names:
            yield model
            return
        pending: dict[str, tuple[torch.Tensor, int]] = {}
        pools = {name: _TilePool(self, name, core, tile_size, pending) for name in self.names}
        try:
            yield _replacing(model, pools)
        except _StatisticsCollected:
            pass
        # Commit a tile's sums only once it has finished (an OOM mid-tile must not count twice).
        for name, (total, count) in pending.items():
            self._sums[name] = self._sums.get(name, 0) + total
            self._counts[name] = self._counts.get(name, 0) + count

    def finish_collecting(self) -> None:
        self.means = {name: (self._sums[name] / self._counts[name]).float() for name in self.names if name in self._sums}
        missing = [n for n in self.names if n not in self.means]
        if missing:  # a pool that never ran (unusual control flow): leave it per-tile
            self.names = [n for n in self.names if n in self.means]
        self.mode = "apply"


class _TilePool(nn.Module):
    """A global average pool of one tile: in the statistics pass it records the sum over the tile's core (and stops
    the pass after the last pool), in the output pass it returns the whole image's mean."""

    def __init__(self, pooling: GlobalPooling, name: str, core: tuple[int, int, int, int], tile_size: tuple[int, int],
                 pending: dict[str, tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self.pooling, self.name, self.core, self.tile_size, self.pending = pooling, name, core, tile_size, pending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling.mode == "apply":
            return self.pooling.means[self.name].to(device=x.device, dtype=x.dtype).view(*x.shape[:-2], 1, 1)
        fy, fx = x.shape[-2] / self.tile_size[0], x.shape[-1] / self.tile_size[1]
        y0, y1, x0, x1 = self.core
        box = x[..., round(y0 * fy) : round(y1 * fy), round(x0 * fx) : round(x1 * fx)]
        # Summed on the device (no host sync per pool and tile), in float64 where the device has it.
        wide = torch.float32 if box.device.type == "mps" else torch.float64
        self.pending[self.name] = (box.sum(dim=(-2, -1), dtype=wide), box.shape[-2] * box.shape[-1])
        if self.name == self.pooling.names[-1]:
            raise _StatisticsCollected
        return x.mean(dim=(-2, -1), keepdim=True)


def _replacing(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A view of ``root`` in which the submodule of each name is replaced: the modules on the path to each one are
    shallow copies (their own child tables, the same parameters, buffers and attributes); ``root`` is not changed."""
    clones = {"": _shallow(root)}
    for name, module in replacements.items():
        *path, leaf = name.split(".")
        parent, prefix = clones[""], ""
        for part in path:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix not in clones:
                clones[prefix] = _shallow(parent._modules[part])
                parent._modules[part] = clones[prefix]
            parent = clones[prefix]
        parent._modules[leaf] = module
    return clones[""]


def _shallow(module: nn.Module) -> nn.Module:
    clone = object.__new__(type(module))  # not copy.copy: no __getattr__ runs on a half-built module
    clone.__dict__.update(module.__dict__)
    clone.__dict__["_modules"] = dict(module._modules)
    return clone


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
