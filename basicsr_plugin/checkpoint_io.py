"""Atomic checkpoint writing: a file is either the complete previous version or the complete new one.

BasicSR writes checkpoints with a bare ``torch.save(obj, path)``; a process killed mid-write (``kill -9``, OOM, a
pre-empted job) leaves a truncated ``.pth``/``.state`` that ``--auto_resume`` then picks up and fails on. Writing to a
temporary file in the same folder, flushing it to disk and renaming it over the target makes every save atomic on
POSIX and Windows (``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every OS/filesystem can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
