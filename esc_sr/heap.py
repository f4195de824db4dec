"""Freed memory kept for reuse while the model runs on the CPU (glibc's malloc), given back when the call ends.

Why. torch's CPU tensors come straight from ``malloc``, and every operator of an ESC forward allocates its output
afresh. glibc serves blocks over its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` and
returns them with ``munmap`` when freed, and it trims freed memory off the top of its heap as soon as there is
more than the trim threshold. Either way the next operator's output lands on pages the kernel must fault in and
zero again: some 315,000 page faults (1.2 GiB) per ESC ×4 forward at 180×320, which is 19 % of its time on the
2-core AMD EPYC development VM (4.80 s against 3.87 s single-threaded with the memory kept; GELU and the adds,
the first to touch each new output, were 3× and 2.6× slower).

So, for the duration of a model call on the CPU (:func:`reusing_freed_memory`, applied by
:func:`esc_sr.upscale`), nothing is mmapped (``M_MMAP_MAX`` 0) and nothing trimmed (``M_TRIM_THRESHOLD``
at its largest, 2 GiB): freed blocks stay in the heap and the next allocation reuses them. When the outermost call returns
the defaults are restored and ``malloc_trim`` gives the freed pages back, so a host process (ComfyUI, a notebook)
is not left holding its peak. The peak itself does not grow: memory is reused, not added.

Not applied when the user tunes malloc (any ``MALLOC_*`` variable or a ``glibc.malloc`` tunable in
``GLIBC_TUNABLES``), or off glibc (musl, macOS, Windows: there is no such call, and nothing is changed). The
settings are process-wide: another thread allocating during the call shares them, for the same few seconds.

Importing this module loads no torch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["reusing_freed_memory", "applies"]

# mallopt parameters and glibc's defaults (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_LARGEST_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top is the most it can be told to keep

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (present only in glibc)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _user_tunes_malloc(environ: os._Environ | dict[str, str]) -> bool:
    return any(name.startswith("MALLOC_") for name in environ) \
        or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def applies(device: Any = "cpu") -> bool:
    """Whether a model call on ``device`` keeps freed memory here: a CPU device, glibc, malloc not tuned by the user."""
    kind = device if isinstance(device, str) else getattr(device, "type", str(device))
    return str(kind).split(":")[0] == "cpu" and _glibc() is not None and not _user_tunes_malloc(os.environ)


@contextmanager
def reusing_freed_memory(device: Any = "cpu") -> Iterator[bool]:
    """Keep freed memory in the heap for the block (see the module docstring); nests, and only the outermost
    block changes and restores the settings. Yields whether the policy applies."""
    global _depth
    if not applies(device):
        yield False
        return
    libc = _glibc()
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
