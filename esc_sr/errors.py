"""The engine's errors (every one an :class:`esc_arch.ESCError`: one line, safe to print)."""

from __future__ import annotations

from esc_arch.errors import ESCError

__all__ = ["EngineError", "ImageWarning", "OutOfMemory"]


class EngineError(ESCError, RuntimeError):
    """A request the engine cannot carry out (bad argument, unsupported precision, ...)."""


class OutOfMemory(EngineError, MemoryError):
    """Out of memory even at the smallest tile, or with tiling disabled."""


class ImageWarning(RuntimeWarning):
    """A warning about the image being upscaled (its pixels, its tiles, its precision): ``esc-sr upscale`` prints it
    after the image's name. Any other warning (the runtime's, torch's) concerns the process and is printed once,
    after the command's name."""
