"""Atomic checkpoint writing: a file is either the complete previous version or the complete new one.

BasicSR writes checkpoints with a bare ``torch.save(obj, path)``; a process killed mid-write (``kill -9``, OOM, a
pre-empted job) leaves a truncated ``.pth``/``.state`` that ``--auto_resume`` then picks up and fails on. Both
helpers here write through :func:`esc_sr.atomic.atomic_write` (temporary file in the same folder, fsync,
permissions from the umask, rename over the target).
"""

from __future__ import annotations

from typing import Any

import torch

from esc_sr.atomic import atomic_write, write_text


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically.

    The temporary file ends in ``.tmp``, not ``.pth``/``.state``: what a killed run leaves behind must not look like a
    checkpoint to tools that scan the experiment folders (stock BasicSR's auto-resume parses every ``*.state`` name).
    """
    with atomic_write(path, suffix=".tmp") as temp, open(temp, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_text(path, text)
