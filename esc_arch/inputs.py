"""Opening the files users hand us (checkpoints, images): regular files only, each problem worded once.

:func:`open_regular_file` is the one way :mod:`esc_arch.checkpoint` and :mod:`esc_sr.images` open an input. It
refuses what is not a regular file (``/dev/zero`` would be read until memory runs out, a FIFO would block forever)
without reading from it, and turns every ``OSError`` into a short reason (:func:`esc_arch.errors.os_error_reason`):
a symlink loop is a symlink loop, not "not found", and an unreadable file is "permission denied", not "corrupt".
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from .errors import os_error_reason

__all__ = ["UnusableFile", "open_regular_file"]

_KINDS = {
    stat.S_IFDIR: "is a directory, not a file",
    stat.S_IFIFO: "is a FIFO (named pipe), not a regular file",
    stat.S_IFCHR: "is a character device, not a regular file",
    stat.S_IFBLK: "is a block device, not a regular file",
    stat.S_IFSOCK: "is a socket, not a regular file",
}


class UnusableFile(ValueError):
    """Why a path cannot be read as an input file; ``str()`` is the reason alone (callers prefix the name)."""


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "is not a regular file")


def open_regular_file(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed): ``(handle, size in bytes)``.

    Raises :class:`UnusableFile` with the reason: missing, unreadable, a symlink loop, a directory, a FIFO or
    device, an empty file. Opening never blocks (``O_NONBLOCK``: a FIFO is recognised, not waited on).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        try:
            kind = _not_regular(os.stat(path).st_mode)  # Windows cannot open a folder: say what it is
        except OSError:
            kind = None
        raise UnusableFile(kind or os_error_reason(error)) from None
    try:
        info = os.fstat(fd)
        problem = _not_regular(info.st_mode)
        if problem is None and info.st_size == 0:
            problem = "empty file (0 bytes)"
        if problem is not None:
            raise UnusableFile(problem)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), int(info.st_size)
    except BaseException:
        os.close(fd)
        raise
