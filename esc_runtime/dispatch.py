"""Choosing each layer's implementation once, when a model is prepared, with a reason for every one passed over.

As xformers' dispatch does for attention: the implementations of a kind are tried in order of preference
(:data:`esc_runtime.layers.KINDS`), the first that does not reject the layer on the target is used, and the
reasons of those before it are kept, so ``esc-sr info`` and the tests can say why a fast path is not taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

from torch import nn

from .layers import KINDS, Implementation, Target


@dataclass
class Choice:
    """What runs one kind of layer of a prepared model, and why the implementations before it do not."""

    kind: str
    implementation: Implementation
    rejected: list[tuple[str, str]] = field(default_factory=list)
    layers: int = 1
    why: str | None = None  # why the chosen one runs, where it says (the native kernels: by measurement)

    def describe(self) -> str:
        passed_over = "; ".join(f"not {name}: {reason}" for name, reason in self.rejected)
        count = f" x{self.layers}" if self.layers > 1 else ""
        return f"{self.kind}{count}: {self.implementation.name}" + (f" [{self.why}]" if self.why else "") + \
            (f" ({passed_over})" if passed_over else "")


def choose(kind: str, layer: nn.Module, target: Target, disable: Collection[str] = ()) -> Choice:
    """The first implementation of ``kind`` that runs ``layer`` on ``target`` and is not named in ``disable`` (the
    last, the plain module, always runs)."""
    rejected = []
    for implementation in KINDS[kind]:
        reason = implementation.rejects(layer, target)
        if reason is None and implementation.name in disable and implementation is not KINDS[kind][-1]:
            reason = "disabled by the caller"
        if reason is None:
            return Choice(kind, implementation, rejected, why=implementation.why(layer, target))
        rejected.append((implementation.name, reason))
    raise AssertionError(f"no implementation of {kind} accepts {type(layer).__name__}")  # the plain module always does
