"""Freed memory kept for reuse while the model runs on the CPU (glibc's malloc), given back when the call ends.

Why. torch's CPU tensors come straight from ``malloc``, and every operator of an ESC forward allocates its output
afresh. glibc serves blocks over its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` and
returns them with ``munmap`` when freed, and it trims freed memory off the top of its heap as soon as there is more
than the trim threshold. Either way the next operator's output lands on pages the kernel must fault in and zero
again: some 315,000 page faults (1.2 GiB) per ESC ×4 forward at 180×320, 12-19 % of its time on the 2-core AMD EPYC
development VM (single-threaded: 4.80 s against 3.87 s with freed memory kept for the whole process; 4.5-4.8 s
against 4.0-4.2 s in one process with this module's per-call scope, whose trim at the end costs the next call some
50,000 faults). GELU and the adds, the first operators to touch each new output, were 3× and 2.6× slower.

So, for the duration of a model call on the CPU (:func:`reusing_freed_memory`, applied by :func:`esc_sr.upscale` and
by CPU training), blocks up to 32 MiB come from the heap (``M_MMAP_THRESHOLD`` at the largest value glibc's adaptive
rule reaches) and freed memory is not trimmed (``M_TRIM_THRESHOLD`` at its largest, 2 GiB): the next allocation
reuses it. Larger blocks stay mmapped, so they cannot fragment the heap. Measured (ESC ×4, one thread, fresh
processes): no page faults left at 180×320 (4.65 s against 5.42 s), peak RSS of a 384×384 upscale 515 MB against 452
MB (+14 %; with mmap disabled altogether it was 782 MB). When the outermost call returns, the trim threshold goes
back to what glibc's own adaptive rule sets for that mmap threshold (twice it, 64 MiB) and ``malloc_trim`` gives the
freed pages back, so a host process (ComfyUI, a notebook) is not left holding its peak. The mmap threshold stays at
32 MiB, where glibc's adaptive rule takes it anyway once a torch program has freed a tensor of that size; it cannot
be handed back to that rule (glibc has no call for it): later CPU work in the process reuses memory as well
(``benchmarks/official_cpu.py``: a bare ``model(x)`` in the worker that had run ``upscale`` took 2.14 s against
``upscale``'s 2.18 s).

What it costs is memory: the heap keeps freed blocks it cannot merge, so a process holds more than its live tensors.
Measured (``benchmarks/memory_estimate.py``, untiled upscales in fresh processes) at 64-128 px inputs, where every
block comes from the heap: 1.2-2.6x the live peak (ESC+LTE 2.6x, ESC-XL 2.4x, ESC 2.3x), at most 1.81x the engine's
memory estimate; about 1.04x the live peak for ESC at 256-512 px, where the large maps are mmapped.
:data:`WORST_RETENTION` rounds the worst up; the engine keeps freed memory only where that multiple of its memory
estimate fits the free memory, and otherwise leaves glibc as it is.

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
from typing import Any, Iterator, Mapping

__all__ = ["reusing_freed_memory", "returning_freed_memory", "held_bytes", "applies", "WORST_RETENTION"]

#: The most the process may hold under the policy, as a multiple of the engine's memory estimate (measured: 1.81x).
WORST_RETENTION = 2.5

# mallopt parameters (malloc/malloc.h) and limits (malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # where glibc's adaptive threshold stops (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
_LARGEST_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top is the most it can be told to keep
_ADAPTIVE_TRIM = 2 * _LARGEST_MMAP_THRESHOLD  # glibc's own rule: trim threshold = twice the mmap threshold

_lock = threading.Lock()
_depth = 0  # open reusing_freed_memory blocks
_returning = 0  # open returning_freed_memory blocks inside them
_baseline = 0  # the heap's free bytes when it last held nothing resident for us (the scope opened, or a trim)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (present only in glibc)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
            libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):
        return None


def _user_tunes_malloc(environ: Mapping[str, str]) -> bool:
    return any(name.startswith("MALLOC_") for name in environ) \
        or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def applies(device: Any = "cpu") -> bool:
    """Whether a model call on ``device`` keeps freed memory here: a CPU device, glibc, malloc not tuned by the user."""
    kind = device if isinstance(device, str) else getattr(device, "type", str(device))
    return str(kind).split(":")[0] == "cpu" and _glibc() is not None and not _user_tunes_malloc(os.environ)


def _free_in_heap(libc: Any) -> int:
    return int(libc.mallinfo2().fordblks) if hasattr(libc, "mallinfo2") else 0


@contextmanager
def reusing_freed_memory(device: Any = "cpu") -> Iterator[bool]:
    """Keep freed memory in the heap for the block (see the module docstring); nests, and only the outermost
    block changes and restores the settings. Yields whether the policy applies.

    :func:`esc_sr.upscale` opens one per call. A host that upscales many images in a row (``esc-sr upscale`` over
    a folder, a script's loop) opens one around the loop, so each call reuses what the previous one freed instead
    of faulting it in again; the memory is given back when the loop ends."""
    global _depth, _baseline
    if not applies(device):
        yield False
        return
    libc = _glibc()
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM)
            _baseline = _free_in_heap(libc)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _ADAPTIVE_TRIM)
                libc.malloc_trim(0)


@contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Inside a :func:`reusing_freed_memory` block: give the freed memory back now and trim as glibc would for
    the block, for a call whose working set would not fit beside what the heap may hold; keep again after it.
    Outside one (or where the policy does not apply) it changes nothing."""
    global _returning, _baseline
    libc = _glibc()
    with _lock:
        active = _depth > 0
        if active:
            _returning += 1
            libc.mallopt(_M_TRIM_THRESHOLD, _ADAPTIVE_TRIM)
            libc.malloc_trim(0)
    try:
        yield
    finally:
        if active:
            with _lock:
                _returning -= 1
                if _depth > 0 and _returning == 0:
                    libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM)
                    _baseline = _free_in_heap(libc)  # what the trim gave back is counted as free memory by the OS


def held_bytes() -> int:
    """Freed memory the heap holds for this process's reuse under :func:`reusing_freed_memory` (0 outside it),
    which the memory checks count as available: the process may reuse it, but the OS does not count it as free.

    A lower bound: free heap bytes above what the heap held free when it last held none of it resident (when the
    outermost block opened, or after a trim), whose pages the OS may have reclaimed."""
    libc = _glibc()
    if libc is None or _depth == 0 or _returning:
        return 0
    return max(0, _free_in_heap(libc) - _baseline)
