"""One model on one device: a forward pass over one tile or the whole image, with the half-precision overflow
guard (redone in fp32) and the global pools of crop-overlap tiles."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from esc_runtime import TiledMaps

from .errors import EngineError, ImageWarning
from .tiling import GlobalPooling

# Output pixels an arbitrary-scale (LTE) decode query holds at once: its intermediates are ~a dozen (queries x 256)
# tensors, about 200 MB at this size in fp32.
MAX_QUERIES = 16384


@dataclass
class Runner:
    """Runs the model on one LR tile; guards half precision against overflow; applies global pools."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    pooling: GlobalPooling | None = None
    fp32: Callable[[], nn.Module] | None = field(default=None, repr=False)  # prepares the fp32 model on demand
    make_room: Callable[[], None] | None = field(default=None, repr=False)  # the host frees memory it holds
    _fp32_model: nn.Module | None = field(default=None, repr=False)
    _warned_overflow: bool = False

    def __post_init__(self) -> None:
        if self.pooling is None:
            self.pooling = GlobalPooling(self.model)

    def __call__(self, tile: torch.Tensor, core: tuple[int, int, int, int] | None = None) -> torch.Tensor | None:
        """Model output for ``tile`` (on the device); ``core``: the box of the tile that will be kept.

        In the statistics pass of :class:`GlobalPooling` this returns None (no output needed).
        """
        core = core or (0, tile.shape[-2], 0, tile.shape[-1])
        out = self._forward(self.model, tile, self.dtype, core)
        if out is not None and self._overflowed(out):
            out = self._forward(self._fp32(), tile, torch.float32, core)
        return out

    def stream(self, image: torch.Tensor, maps: TiledMaps, *, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The model's output for the whole ``image``, layer-streamed over ``maps``' tiles (on the device); an
        arbitrary-scale model renders ``size`` (its queries decoded in chunks)."""

        def run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
            x = image.to(device=self.device, dtype=dtype)
            if getattr(model, "arbitrary_scale", False):
                return model.upscale_by(x, size=size, maps=maps, max_queries=MAX_QUERIES)
            return model(x, maps)

        out = self._guarded(self.model, lambda: run(self.model, self.dtype))
        return run(self._fp32(), torch.float32) if self._overflowed(out) else out

    def _overflowed(self, out: torch.Tensor) -> bool:
        """fp16 can overflow inside the network on unusual content: then the work is redone in fp32."""
        if self.dtype == torch.float32 or bool(torch.isfinite(out).all()):
            return False
        if not self._warned_overflow:
            warnings.warn("half-precision overflow; recomputing it in fp32", ImageWarning, stacklevel=4)
            self._warned_overflow = True
        return True

    def _fp32(self) -> nn.Module:
        if self._fp32_model is None:  # from the caller's weights, not a round trip through fp16
            self._fp32_model = self.fp32() if self.fp32 is not None else self.model
        return self._fp32_model

    def call(self, model: nn.Module, fn: Callable[[nn.Module], Any], core, tile_size) -> Any:
        """``fn(view)`` for one tile, ``view`` being ``model`` with the image's global pools (:meth:`GlobalPooling.view`);
        None in the statistics pass."""
        result = None
        with self.pooling.view(model, core, tile_size) as view:
            result = fn(view)
        return result if self.pooling.mode != "collect" else None

    def _forward(self, model: nn.Module, tile: torch.Tensor, dtype: torch.dtype, core) -> torch.Tensor | None:
        size = tuple(tile.shape[-2:])
        out = self._guarded(model, lambda: self.call(model, lambda view: view(tile.to(device=self.device, dtype=dtype)), core, size))
        return out  # on the device: the caller copies only the core it keeps to the host

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
