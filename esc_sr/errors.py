"""The engine's errors (every one an :class:`esc_arch.ESCError`: one line, safe to print)."""

from __future__ import annotations

from esc_arch.errors import ESCError

__all__ = ["EngineError", "OutOfMemory"]


class EngineError(ESCError, RuntimeError):
    """A request the engine cannot carry out (bad argument, unsupported precision, ...)."""


class OutOfMemory(EngineError, MemoryError):
    """Out of memory even at the smallest tile, or with tiling disabled."""
