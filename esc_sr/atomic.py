"""The one way this project writes a file: completely or not at all, with ordinary permissions.

Every writer (checkpoints, :func:`esc_sr.save_model`, images, ONNX files, the chaiNNer hook, BasicSR training states,
benchmark results, the demo) goes through :func:`atomic_write`. The data goes to a temporary file in the target's
own folder (so the final rename never crosses a filesystem), is flushed to disk, gets the permissions a plain
``open(path, "w")`` would give under the current umask, and is renamed over the target. A crash or a kill at any
moment leaves either the old file or the new one, plus at worst a hidden ``.esc-sr-tmp-*`` file, never a truncated
target; :func:`remove_stale` sweeps such leftovers (``esc-sr upscale`` does, in its output folders).

A write that fails raises an ``OSError`` whose ``filename`` is the target (never the temporary file) and whose
``strerror`` is the reason underneath: a full disk, a target that is a folder, a parent that is a regular file ("not
a directory"), also where the writer wraps the OS error in its own (safetensors' ``SafetensorError``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
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
    try:
        ensure_folder(path.parent)
    except OSError as exc:
        raise _naming(path, exc) from exc
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    try:
        fd, temp_name = tempfile.mkstemp(
            prefix=TEMP_PREFIX, suffix=path.suffix if suffix is None else suffix, dir=path.parent
        )
    except OSError as exc:
        raise _naming(path, exc) from exc
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        with open(temp, "rb+") as handle:  # the writer may have closed its own handle without fsync
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        failure = _write_failure(path, temp, exc)
        if failure is None:
            raise
        raise failure from exc
    _fsync_folder(path.parent)


def ensure_folder(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` and its parents where missing. Where a part of the path is a regular file, the error says
    so (``mkdir`` itself says "File exists", naming the folder)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocking is None:
            raise
        raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a directory", str(folder)) from exc


def _naming(path: Path, exc: OSError) -> OSError:
    """``exc`` as an ``OSError`` of the same kind about ``path``, with the reason in plain words."""
    code = exc.errno
    reason = "is a directory, not a file" if code == errno.EISDIR else (
        exc.strerror or (os.strerror(code) if code else str(exc) or type(exc).__name__))
    return OSError(code, reason, str(path))  # OSError picks the subclass of the code (IsADirectoryError, ...)


def _write_failure(path: Path, temp: Path, exc: BaseException) -> OSError | None:
    """The error to raise for a write of ``path`` (through ``temp``) that failed with ``exc``: an ``OSError`` naming
    ``path``, or None to raise ``exc`` as it is: not the file system's (the writer's own error, an interruption, a
    network error inside a download: its caller words it) or naming another file already. A writer that wraps the OS
    error in its own keeps its code in the text (safetensors: ``IoError(Os { code: 28, ... })``)."""
    if isinstance(exc, OSError):
        if exc.errno is None or isinstance(exc, (ConnectionError, TimeoutError)):
            return None
        if exc.filename is not None and str(exc.filename) != str(temp) and str(exc.filename2 or "") != str(path):
            return None
        return _naming(path, exc)
    if not isinstance(exc, Exception):
        return None
    found = re.search(r"\bOs \{ code: (\d+)|\(os error (\d+)\)|\[Errno (\d+)\]", str(exc))
    if found is None:
        return None
    code = int(next(group for group in found.groups() if group))
    return OSError(code, os.strerror(code), str(path))


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
