"""Shared plumbing of the benchmark scripts: device choice, timing, memory probes, machine description.

Timing follows the paper's ``scripts/test_direct_metrics.py`` where it can: batch 1, fp32, inputs uniform in
[0, 1], ``torch.inference_mode()``, warm-up runs first, then the median of the timed runs.  On CUDA each run
is timed between CUDA events; on CPU with ``time.perf_counter``.

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the timed runs (what the paper reports);
on CPU the peak resident set size (VmHWM) of a fresh process, which ``peak_memory.py`` arranges.

Also the pieces every script repeats: its command line (:func:`script_parser`, :func:`parse_args`), the machine it
ran on (:func:`machine_info`), its results file (:func:`write_payload`, :func:`write_results`) and the fresh child
process that reports one JSON line (:func:`run_child`, :func:`emit`).  torch is imported where it is used, not
here: ``official_cpu``'s workers must set their thread environment before torch loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_DIR = REPO_ROOT.parent / "shared"  # reference data beside the checkout, as tests/golden.py
GOLDEN_DIR = SHARED_DIR / "fixtures" / "golden"
MIB = 2**20


# ----------------------------------------------------------------------------------------------- devices
def pick_device(name: str | None = "auto") -> torch.device:
    """'auto' means CUDA when a GPU is visible, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to torch {torch.__version__}")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def parse_size(text: str) -> tuple[int, int]:
    """'180x320' -> (180, 320): height x width of the low-resolution input."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 180x320")
    return int(match.group(1)), int(match.group(2))


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ----------------------------------------------------------------------------------------------- command line
#: The options several scripts take: flags and argparse keywords; each script gives its own default.
SHARED_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "device": (("--device",), {"help": "auto (CUDA if visible), cpu, cuda, cuda:1 ..."}),
    "threads": (("--threads",), {"type": int, "help": "torch CPU threads (default: torch's choice)"}),
    "warmup": (("--warmup",), {"type": int, "help": "untimed runs first"}),
    "runs": (("--runs",), {"type": int, "help": "timed runs"}),
    "size": (("--size",), {"type": parse_size, "metavar": "HxW", "help": "LR input HEIGHTxWIDTH"}),
    "out": (("--out",), {"type": Path, "help": "results file"}),
}


def script_parser(doc: str | None, **defaults: Any) -> argparse.ArgumentParser:
    """The parser of a script: its module docstring as the description, plus each shared option named in
    ``defaults`` (:data:`SHARED_OPTIONS`) with that default, e.g. ``script_parser(__doc__, device="auto", runs=5)``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        flags, spec = SHARED_OPTIONS[name]
        help_text = spec.get("help", "")
        if default is not None and name != "device":
            help_text += f" (default {format_size(default) if name == 'size' else default})"
        parser.add_argument(*flags, **{**spec, "default": default, "help": help_text})
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and apply ``--threads`` when the script has it and it is given."""
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Latencies of repeated runs of one callable, in milliseconds."""

    times_ms: list[float]
    warmup: int
    first_call_ms: float  # the first warm-up call: includes compilation, allocator growth, lazy init
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        times = sorted(self.times_ms)
        return {
            "median_ms": round(self.median_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "min_ms": round(times[0], 3),
            "max_ms": round(times[-1], 3),
            "runs": len(times),
            "warmup": self.warmup,
            "first_call_ms": round(self.first_call_ms, 3),
            "times_ms": [round(t, 3) for t in self.times_ms],
        }


def time_callable(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    runs: int,
    after_warmup: Callable[[], Any] | None = None,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed (at least once), call ``after_warmup`` (e.g. to reset the
    peak-memory counters, as the paper does), then run ``fn`` ``runs`` times timed."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = (time.perf_counter() - start) * 1e3
    for _ in range(max(warmup, 1) - 1):
        fn()
    synchronize(device)
    if after_warmup is not None:
        after_warmup()
    times = [time_once(fn, device) for _ in range(runs)]
    return Timing(times_ms=times, warmup=max(warmup, 1), first_call_ms=first)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU), with no warm-up."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc), or None where /proc is unavailable."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process since start or the last reset."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource  # no /proc (macOS): ru_maxrss is in bytes there, KiB on Linux

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs).

    This lets a process measure the peak of its timed runs only, like ``reset_peak_memory_stats`` on CUDA,
    instead of a peak set by start-up work (imports, compilation).  Returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: the benchmarks share this machine, so every result records it."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (stored in every results file)."""
    import torch

    info: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": None if _total_memory_bytes() is None else round(_total_memory_bytes() / 2**30, 1),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average_at_start": load_average(),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name of the machine kind, e.g. 'cpu-intel-xeon-processor-2-50ghz-2c'."""
    if info.get("device") == "cuda":
        base = f"cuda-{info.get('gpu', 'gpu')}"
    else:
        base = f"cpu-{info.get('cpu', 'cpu')}-{info.get('logical_cpus', '?')}c"
    slug = re.sub(r"\(r\)|\(tm\)|@", "", base.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    return slug[:80]


# ----------------------------------------------------------------------------------------------- files
def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as JSON through :func:`esc_sr.atomic.atomic_write`."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` through :func:`esc_sr.atomic.atomic_write`."""
    from esc_sr.atomic import write_text

    write_text(Path(path), text)


def write_payload(out: str | Path, payload: dict[str, Any], machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``payload`` to ``out`` (JSON) with the machine's description first, under ``machine`` (default: this
    CPU now; pass :func:`machine_info` taken before the runs to record the load without the benchmark), and say so
    on stderr.  Returns what was written."""
    if machine is None:
        import torch

        machine = machine_info(torch.device("cpu"))
    written = {"machine": machine, **payload}
    write_json_atomic(out, written)
    log(f"wrote {out}")
    return written


def write_results(out: str | Path, rows: list[dict[str, Any]], markdown: Callable[[list, dict], str]) -> str:
    """Write ``rows`` with this machine's description as ``out`` (JSON) and their ``markdown(rows, machine)`` table
    beside it (``.md``); returns the table."""
    machine = write_payload(out, {"results": rows})["machine"]
    table = markdown(rows, machine)
    write_text_atomic(Path(out).with_suffix(".md"), table)
    return table


def print_json(result: Any) -> int:
    """The result on stdout as JSON (the scripts that write no file); the exit status 0."""
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------- child processes
def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with the repository on PYTHONPATH (a child imports ``benchmarks``) and ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def emit(marker: str, result: Any) -> None:
    """Child side of :func:`run_child`: the result as one marked JSON line on stdout."""
    print(marker + json.dumps(result), flush=True)


def run_child(module: str, args: list[str], marker: str, *, timeout_s: float | None = None,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process and return the JSON of its last line that starts with
    ``marker`` (see :func:`emit`).  Never raises for a failing child: the result then holds ``error`` (one line:
    the last line of its stderr, or its exit status) and ``stderr_tail``."""
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=child_env(env),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    reason = tail[-1] if tail else f"exit status {proc.returncode}, no output"
    return {"error": reason[:500], "stderr_tail": "\n".join(tail[-15:])[-3000:]}


def log(message: str) -> None:
    """Progress to stderr, so stdout stays machine-readable for the subprocess protocol."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
