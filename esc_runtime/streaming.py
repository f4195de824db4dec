"""Layer-streamed execution: exact tiling for images whose activations do not fit in memory at once.

Every ESC forward pass is written as a chain of *stages*, each a function of a few feature maps that is local
(an output pixel depends on input pixels within a known radius) or a global average. A :class:`MapRunner` runs
the stages:

* :data:`WHOLE` (the default) calls each stage on the whole map: the ordinary forward pass, op for op.
* :class:`TiledMaps` runs every stage over all tiles before the next stage starts, keeping each stage's output as
  a whole feature map. Each tile needs only its stage's own radius of context (a 3x3 conv: 1 pixel, the 13x13
  large kernel: 6), window attention on tiles aligned to the window grid needs none, and the global averages of
  the dynamic kernels are taken over the whole map, so the result equals the untiled one up to float rounding.
  The price is a few whole LR feature maps (``dim`` channels) in memory: the activations of one tile are what
  the tile size bounds.

Writing a forward pass for both: ``maps.local(fn, *tensors, radius=r)`` for a local stage (``tensors[0]`` sets
the tile grid; other tensors may be at integer multiples of its resolution; ``r`` is in pixels of
``tensors[0]``), ``maps.mean(t)`` for a global average (``None`` under :data:`WHOLE`, where the model's own
pooling layer averages). ``into=i`` lets a tiled stage write its output over ``tensors[i]`` (one whole map fewer
at the peak): only for a map the forward pass owns and uses no more, that the stage reads pointwise (a residual
added at the same pixel) or, at radius 0, window by window. Each tile writes only the pixels no earlier tile wrote,
so what a later tile reads of that map beyond its own pixels (context, or the window that a side's last tile
repeats) may already be overwritten: those results are the ones it does not keep.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Protocol

import torch

__all__ = ["MapRunner", "WholeMaps", "WHOLE", "TiledMaps", "count_stages"]

Stage = Callable[..., torch.Tensor]


class MapRunner(Protocol):
    def local(self, fn: Stage, *maps: torch.Tensor, radius: int, into: int | None = None) -> torch.Tensor: ...

    def mean(self, x: torch.Tensor) -> torch.Tensor | None: ...


class WholeMaps:
    """Runs every stage on the whole map: the plain forward pass (traceable, exportable)."""

    def local(self, fn: Stage, *maps: torch.Tensor, radius: int, into: int | None = None) -> torch.Tensor:
        return fn(*maps)

    def mean(self, x: torch.Tensor) -> torch.Tensor | None:
        return None


WHOLE = WholeMaps()


def _ratio(size: int, reference: int) -> Fraction:
    return Fraction(size, reference)


def _scaled(value: int, factor: Fraction, what: str) -> int:
    scaled = value * factor
    if scaled.denominator != 1:
        raise ValueError(f"{what}: {value} px at a resolution factor of {factor} is not a whole number of pixels")
    return int(scaled)


class TiledMaps:
    """Runs each stage tile by tile over whole feature maps (see the module docstring).

    ``tile`` is the side of a tile in pixels of each stage's grid, a multiple of the attention ``window``: tiles
    on the window grid keep window attention exact without context. ``on_stage()`` is called after each stage
    (progress; :func:`count_stages` says how many there are).
    """

    def __init__(self, tile: int, *, window: int = 1, on_stage: Callable[[], None] | None = None) -> None:
        if tile <= 0 or window <= 0 or tile % window:
            raise ValueError(f"the tile ({tile}) must be a positive multiple of the window ({window})")
        self.tile = int(tile)
        self.window = int(window)
        self.on_stage = on_stage

    def _spans(self, size: int) -> list[tuple[int, int]]:
        spans = [(start, min(start + self.tile, size)) for start in range(0, size, self.tile)]
        # A side that is not a multiple of the window ends in a partial window, which attention fills by reflecting
        # the pixels before it: a tile holding only that partial window would reflect itself instead. So the last
        # tile then starts one window earlier (that window is computed twice, identically).
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < self.window:
            spans[-1] = (spans[-1][0] - self.window, size)
        return spans

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The tile cores ``(y0, y1, x0, x1)`` of a ``height x width`` grid (they cover it; they may overlap)."""
        return [(y0, y1, x0, x1) for y0, y1 in self._spans(height) for x0, x1 in self._spans(width)]

    def _written(self, size: int) -> list[tuple[int, int, int]]:
        """The spans in the order they run, each ``(start, end, first)``: it writes the pixels from ``first`` on, the
        ones no span before it in the grid covers.

        A last span that repeats the window before it runs before that span: it reads that window (attention's
        reflection for a partial last window) before the span that writes it may have overwritten it (``into``).
        """
        spans = self._spans(size)
        order = [(start, end, start if i == 0 else max(start, spans[i - 1][1])) for i, (start, end) in enumerate(spans)]
        if len(spans) > 1 and spans[-1][0] < spans[-2][1]:
            order[-2], order[-1] = order[-1], order[-2]
        return order

    def local(self, fn: Stage, *maps: torch.Tensor, radius: int, into: int | None = None) -> torch.Tensor:
        height, width = maps[0].shape[-2:]
        factors = [(_ratio(m.shape[-2], height), _ratio(m.shape[-1], width)) for m in maps]
        out: torch.Tensor | None = None if into is None else maps[into]
        out_factor: tuple[Fraction, Fraction] | None = None if into is None else factors[into]
        tiles = [(y, x) for y in self._written(height) for x in self._written(width)]
        for (y0, y1, wy0), (x0, x1, wx0) in tiles:
            cy0, cy1 = max(0, y0 - radius), min(height, y1 + radius)
            cx0, cx1 = max(0, x0 - radius), min(width, x1 + radius)
            parts = [
                m[..., _scaled(cy0, fy, "tile"):_scaled(cy1, fy, "tile"), _scaled(cx0, fx, "tile"):_scaled(cx1, fx, "tile")]
                for m, (fy, fx) in zip(maps, factors)
            ]
            result = fn(*parts)
            if out is None:
                out_factor = (_ratio(result.shape[-2], cy1 - cy0), _ratio(result.shape[-1], cx1 - cx0))
                shape = (*result.shape[:-2], _scaled(height, out_factor[0], "output"), _scaled(width, out_factor[1], "output"))
                out = torch.empty(shape, dtype=result.dtype, device=result.device, memory_format=_layout(result))
            fy, fx = out_factor
            ry0, ry1 = _scaled(wy0 - cy0, fy, "output"), _scaled(y1 - cy0, fy, "output")
            rx0, rx1 = _scaled(wx0 - cx0, fx, "output"), _scaled(x1 - cx0, fx, "output")
            out[..., _scaled(wy0, fy, "output"):_scaled(y1, fy, "output"), _scaled(wx0, fx, "output"):_scaled(x1, fx, "output")] = (
                result[..., ry0:ry1, rx0:rx1]
            )
            del result, parts
        if self.on_stage is not None:
            self.on_stage()
        assert out is not None
        return out

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        # The whole map's average, as the model's AdaptiveAvgPool2d(1) would take it untiled.
        return x.mean(dim=(-2, -1), keepdim=True)


def _layout(t: torch.Tensor) -> torch.memory_format:
    """The memory format of a stage's output, kept for the whole map (channels-last on the oneDNN path)."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _CountingMaps(WholeMaps):
    def __init__(self) -> None:
        self.stages = 0

    def local(self, fn: Stage, *maps: torch.Tensor, radius: int, into: int | None = None) -> torch.Tensor:
        self.stages += 1
        return fn(*maps)


@torch.no_grad()
def count_stages(model: torch.nn.Module) -> int:
    """How many stages ``model``'s forward pass (an arbitrary-scale model's ``encode``) runs, the same for any input
    size: one tiny whole forward."""
    parameter = next(model.parameters())
    window = int(getattr(model, "window_size", 8))
    counter = _CountingMaps()
    forward = model.encode if getattr(model, "arbitrary_scale", False) else model
    forward(torch.zeros(1, 3, window, window, device=parameter.device, dtype=parameter.dtype), counter)
    return counter.stages
