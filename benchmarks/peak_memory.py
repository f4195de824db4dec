"""Run one benchmark case in a fresh Python process and report its latency and peak memory.

Why a fresh process: on CPU the only honest peak-memory number is the resident set size of a process
that ran nothing else (allocator caches, compiled kernels and other models would otherwise inflate it).
On CUDA the same process measures ``torch.cuda.max_memory_allocated``, as the paper does.

Protocol inside the child, mirroring the paper's ``test_direct_metrics``:
  1. import, build the workload (model + input) -> RSS "after build";
  2. warm-up runs; then reset the peak counters (CUDA: ``reset_peak_memory_stats``; CPU: VmHWM via
     ``/proc/self/clear_refs``) -> RSS "before runs";
  3. timed runs -> peak.
Reported memory:
  * ``peak_mb``: CUDA max_memory_allocated over the timed runs (weights + input + activations);
    CPU peak RSS over the timed runs minus the RSS right after the imports, i.e. weights + input +
    activations + allocator slack, without the shared libraries every process carries;
  * ``peak_rss_mb`` (CPU): the absolute peak RSS of the process, libraries included.

A case is a JSON object: ``{"workload": "module:function", "device": "cpu", "warmup": 2, "runs": 10, ...}``
where ``function(case, device)`` returns ``(callable, info_dict)``.  The parent calls
:func:`run_case` and gets a dict back; a failing case returns ``{"error": ...}`` and never raises, so one
broken model does not stop a benchmark run.

Usage (normally called by the other scripts): ``python -m benchmarks peak_memory '<case json>'``.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from typing import Any

from .common import MIB, current_rss_bytes, emit, peak_rss_bytes, reset_peak_rss, run_child, time_callable

RESULT_MARKER = "BENCHMARK-RESULT "


def _resolve(workload: str):
    module_name, _, function = workload.partition(":")
    if not function:
        raise ValueError(f"workload {workload!r} is not 'module:function'")
    return getattr(importlib.import_module(module_name), function)


def measure_here(case: dict[str, Any]) -> dict[str, Any]:
    """Measure ``case`` in this process (the child side of :func:`run_case`)."""
    import torch

    from .common import pick_device

    device = pick_device(case.get("device", "auto"))
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    rss_after_import = current_rss_bytes()
    fn, info = _resolve(case["workload"])(case, device)
    rss_after_build = current_rss_bytes()

    def reset_peaks() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        info["peak_reset"] = reset_peak_rss()
        info["rss_before_runs_mb"] = _mb(current_rss_bytes())
        if device.type == "cuda":
            info["allocated_before_runs_mb"] = round(torch.cuda.memory_allocated(device) / MIB, 1)

    grad = torch.enable_grad() if case.get("grad") else torch.inference_mode()
    with grad:
        timing = time_callable(fn, device, warmup=int(case.get("warmup", 2)), runs=int(case.get("runs", 10)),
                               after_warmup=reset_peaks)
    result: dict[str, Any] = dict(info)
    result.update(timing.as_dict())
    result["rss_after_import_mb"] = _mb(rss_after_import)
    result["rss_after_build_mb"] = _mb(rss_after_build)
    result["peak_rss_mb"] = _mb(peak_rss_bytes())
    if device.type == "cuda":
        result["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        result["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MIB, 1)
        result["memory_kind"] = "cuda max_memory_allocated over the timed runs"
    else:
        baseline = rss_after_import or 0
        result["peak_mb"] = round((peak_rss_bytes() - baseline) / MIB, 1)
        result["memory_kind"] = (
            "peak RSS over the timed runs minus RSS after imports" if info.get("peak_reset")
            else "peak RSS over the whole process minus RSS after imports (VmHWM reset unsupported)"
        )
    result["device"] = device.type
    return result


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which tensors of
# 128 KiB..32 MiB come from the heap and freed space may stay resident, so identical runs gave different peaks
# (benchmarks/README.md, Protocol).  A fixed threshold keeps every tensor-sized block mmapped, so RSS follows live
# memory.  It costs page faults on every large allocation, so latency is measured without it (see ``measure_case``).
FIXED_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_case(
    case: dict[str, Any], *, timeout_s: float = 900, in_process: bool = False, fixed_allocator: bool = False
) -> dict[str, Any]:
    """Measure ``case`` in a fresh subprocess (or here, if ``in_process``) and return its result dict.

    ``fixed_allocator`` runs the child with glibc's mmap threshold fixed (``FIXED_ALLOCATOR_ENV``): use it for
    memory measurements on CPU.  Never raises for a failing workload: the result then holds ``error`` (one
    line) and ``stderr_tail``.
    """
    if in_process:
        try:
            return measure_here(case)
        except Exception as exc:  # one broken case must not stop the run
            return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    return run_child("benchmarks.peak_memory", [json.dumps(case)], RESULT_MARKER, timeout_s=timeout_s,
                     env=FIXED_ALLOCATOR_ENV if fixed_allocator else None)


MEMORY_FIELDS = ("peak_mb", "peak_rss_mb", "peak_reserved_mb", "rss_after_import_mb", "rss_after_build_mb",
                 "rss_before_runs_mb", "allocated_before_runs_mb", "memory_kind", "peak_reset")


def measure_case(case: dict[str, Any], *, in_process: bool = False, split: bool = True) -> dict[str, Any]:
    """Latency and memory of ``case``: on CPU from two fresh processes (latency with the default allocator,
    memory with the fixed one, one warm-up and one run); on CUDA (or in-process) from one.  ``split=False``
    takes both from one fixed-allocator process (cheaper; latency then includes its page faults)."""
    if not split and not in_process:
        result = run_case(case, fixed_allocator=True)
        if "memory_kind" in result:
            result["memory_kind"] += "; glibc mmap threshold fixed (latency from the same process)"
        return result
    result = run_case(case, in_process=in_process)
    if in_process or "error" in result or result.get("device") != "cpu":
        return result
    memory = run_case({**case, "warmup": 1, "runs": 1}, fixed_allocator=True)
    if "error" in memory:
        result["memory_error"] = memory["error"]
        return result
    result.update({k: memory[k] for k in MEMORY_FIELDS if k in memory})
    result["memory_kind"] = f"{memory.get('memory_kind')}; separate process, glibc mmap threshold fixed"
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks peak_memory '<case json>'", file=sys.stderr)
        return 2
    case = json.loads(argv[0])
    try:
        result = measure_here(case)
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    emit(RESULT_MARKER, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
