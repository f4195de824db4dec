"""The one way this project writes a file: completely or not at all, with ordinary permissions.

Every writer (checkpoints, :func:`esc_sr.save_model`, images, ONNX files, the chaiNNer hook, BasicSR training states,
benchmark results, the demo) goes through :func:`atomic_write`. The data goes to a temporary file in the target's
own folder (so the final rename never crosses a filesystem), is flushed to disk, gets the permissions a plain
``open(path, "w")`` would give under the current umask, and is renamed over the target. A crash or a kill at any
moment leaves either the old file or the new one, plus at worst a hidden ``.esc-sr-tmp-*`` file, never a truncated
target; :func:`remove_stale` sweeps such leftovers (``esc-sr upscale`` does, in its output folders).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Prefix of the temporary files; a folder can be swept for leftovers of killed runs by it.
TEMP_PREFIX = ".esc-sr-tmp-"
#: A temporary file untouched for this long is a leftover (a write takes seconds: the data is ready before it starts).
STALE_AFTER_SECONDS = 3600


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, it becomes ``path``.

    The temporary file keeps ``path``'s suffix, so writers that choose a format from the file name (Pillow,
    OpenCV, ``torch.onnx.export``) still do; pass ``suffix`` where a file with the target's suffix would be
    picked up by something while it is being written (a ``.pth`` file in ``site-packages``). If the block
    raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        prefix=TEMP_PREFIX, suffix=path.suffix if suffix is None else suffix, dir=path.parent
    )
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as handle:  # the writer may have closed its own handle without fsync
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, suffix: str | None = None) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, suffix=suffix) as temp, open(temp, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike[str], text: str, *, suffix: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    write_bytes(path, text.encode("utf-8"), suffix=suffix)


def remove_stale(folder: str | os.PathLike[str], *, older_than: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Delete the temporary files (:data:`TEMP_PREFIX`) in ``folder`` not modified for ``older_than`` seconds:
    leftovers of runs killed mid-write (SIGKILL, power loss; a Python exception or SIGTERM handled as one removes
    its own). Younger ones may belong to a write in progress and are kept. Returns what was removed; a file that
    cannot be removed is left alone."""
    import time

    removed = []
    cutoff = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every OS or filesystem can open a folder)."""
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
