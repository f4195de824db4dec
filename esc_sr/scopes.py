"""Where the CPU thread policy and the heap policy are opened: once per upscale call, and once around a batch.

* :func:`call`, around one :func:`esc_sr.upscale`: torch's CPU threads set from the machine's load for the call
  (:func:`esc_sr.threads.policy`) and restored after; freed memory kept for reuse during the call where memory is
  plentiful enough for what the heap then holds (:mod:`esc_sr.heap`), else what a batch scope holds given back.
* :func:`batch`, around many calls (``esc-sr upscale`` over files, a training run): freed memory kept between them,
  so each call reuses what the one before freed instead of faulting it in again.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch

from . import heap, threads
from .memory import fits_untiled


@contextmanager
def call(model: Any, device: torch.device, dtype: torch.dtype, height: int, width: int) -> Iterator[None]:
    """The policies of one upscale of a ``height x width`` image with ``model`` (see the module docstring)."""
    reuse = heap.applies(device) and fits_untiled(model, device, dtype, height, width,
                                                  fraction=1 / heap.WORST_RETENTION)
    with ExitStack() as stack:
        stack.enter_context(threads.policy(device))
        stack.enter_context(heap.reusing_freed_memory(device) if reuse else heap.returning_freed_memory())
        yield


@contextmanager
def batch(device: Any = "cpu") -> Iterator[None]:
    """Freed memory kept between the calls inside the block (given back when it ends)."""
    with heap.reusing_freed_memory(device):
        yield
