"""CPU threads for the model: how many torch uses, chosen per call from the machine's state, and how they wait.

Why. Each of the ~700 operators of an ESC forward pass on a CPU ends at an OpenMP barrier. When another process
holds a core, the team thread on it lags and every operator waits for it, while the other threads *spin* (GNU
OpenMP's default) and keep their cores busy doing nothing: 1.6× slower as soon as anything else runs. Waiting
passively costs nothing measurable on an idle machine, and leaving the busy cores to the others is as fast, in fewer
CPU-seconds. Measurements: benchmarks/README.md, "CPU threads".

The policy, for a model call on the CPU (:func:`scoped`, applied by :func:`esc_sr.upscale` to each image plane):

* **Threads** = the CPUs this process may use (:func:`usable_cpus`) minus the threads of other processes runnable
  now (:func:`runnable_others`), at least 1 and at most torch's default; counted again for every call (reused for
  :data:`REUSE_S`), torch's own setting restored when the call returns.
* **The user's setting wins** and is left alone: ``--threads N`` and the torchrun share (:func:`set_threads`),
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, or a ``torch.set_num_threads`` call (seen as a count other than
  :func:`torch_default_threads`).
* **Waiting** (:func:`configure_environment`, called by ``esc-sr`` before torch is imported):
  ``OMP_WAIT_POLICY=PASSIVE`` where more than one CPU is usable, unless the user set ``OMP_WAIT_POLICY`` or
  ``GOMP_SPINCOUNT``. OpenMP reads it once, when torch loads it: library users call ``configure_environment()``
  first thing in a program, or set the variable.

Importing this module loads no torch (``esc-sr --help`` must stay fast); torch is imported where it is used.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, MutableMapping, TypeVar

__all__ = ["Decision", "usable_cpus", "runnable_others", "torch_default_threads", "choose_threads", "decide",
           "set_threads", "policy", "last_decision", "configure_environment", "wait_policy",
           "THREAD_VARIABLES", "WAIT_VARIABLES"]

F = TypeVar("F", bound=Callable[..., Any])

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch when it sets its default
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # read by GNU OpenMP when it loads
REUSE_S = 1.0  # a decision is reused this long: many small images must not each pay for the sampling
SAMPLES, SAMPLE_INTERVAL_S = 5, 0.002  # about 10 ms per decision; the median ignores a momentary blip


@dataclass(frozen=True)
class Decision:
    """What a call ran with: ``threads`` (None: torch's setting left as it was) and why."""

    threads: int | None
    reason: str
    cpus: int | None = None
    others: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- readings


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered to a cgroup CPU quota (rounded up) if one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The cgroup CPU limit in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None without one; the paths are
    arguments for the tests."""
    try:
        with open(proc_cgroup) as handle:
            unified = next((line.strip().split("::", 1)[1] for line in handle if line.startswith("0::")), None)
    except OSError:
        unified = None
    candidates = []
    if unified is not None:
        candidates.append(("v2", f"{root}{unified.rstrip('/')}/cpu.max"))
    candidates += [("v2", f"{root}/cpu.max"), ("v1", f"{root}/cpu/cpu.cfs_quota_us")]
    for kind, path in candidates:
        try:
            with open(path) as handle:
                text = handle.read().split()
            if kind == "v2":
                return None if text[0] == "max" else int(text[0]) / int(text[1])
            quota = int(text[0])
            with open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")) as handle:
                return None if quota <= 0 else quota / int(handle.read())
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def _runnable_total() -> int | None:
    """Runnable threads on the whole machine now (``/proc/loadavg``'s 4th field, this thread included)."""
    try:
        with open("/proc/loadavg") as handle:
            return int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _own_running() -> int:
    """This process's threads in state R (running or runnable): the reading thread, and OpenMP threads that spin."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                text = handle.read()
        except OSError:
            continue
        if text[text.rfind(")") + 2 : text.rfind(")") + 3] == "R":  # the state follows the (command name)
            count += 1
    return max(count, 1)


def runnable_others(samples: int = SAMPLES, interval: float = SAMPLE_INTERVAL_S) -> float | None:
    """Threads of other processes runnable now, on the CPUs this process may use; None where Linux's /proc is not.

    Each sample is the machine's runnable count minus this process's running threads; the median of
    ``samples`` taken ``interval`` seconds apart. ``/proc/loadavg`` counts the whole host, also inside a container:
    when this process may use only part of the machine's CPUs (a container's cpuset, or a CPU quota such as
    ``docker --cpus 4``: the smaller of the two), the others are taken as spread evenly over all of them, and only
    this part's share of them as competing.
    """
    counts = []
    for index in range(samples):
        total = _runnable_total()
        if total is None:
            return None
        counts.append(max(0, total - _own_running()))
        if index + 1 < samples:
            time.sleep(interval)
    others = float(statistics.median(counts))
    online = os.cpu_count() or 1
    mine = _cpu_share(online)
    return others * mine / online if mine < online else others


def _cpu_share(online: int) -> float:
    """The CPUs' worth of the machine this process may use: its affinity mask, lowered to a cgroup quota."""
    try:
        mine: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = online
    quota = _cgroup_quota()
    return mine if quota is None else min(mine, quota)


def torch_default_threads() -> int:
    """torch's default thread count here when nothing sets it: the physical cores among this process's CPUs
    (MKL's default, which torch's OpenMP build adopts). ``tests/test_threads.py`` checks it against a fresh torch."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    return _physical_cores(cpus)


@functools.lru_cache(maxsize=8)
def _physical_cores(cpus: tuple[int, ...]) -> int:
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as package, open(f"{base}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the CPU as a core
    return max(1, len(cores))


# ------------------------------------------------------------------------------------------- decision


def choose_threads(cpus: int, others: float, ceiling: int) -> int:
    """``cpus`` minus the ``others`` that compete for them, at least 1 and at most ``ceiling`` (torch's default).
    A fractional ``others`` (a container's share) is rounded to the nearest thread."""
    return max(1, min(ceiling, cpus - int(math.floor(others + 0.5))))


def decide(*, current: int, default: int, cpus: int, others: float | None, pinned: int | None,
           environ: Mapping[str, str]) -> Decision:
    """The thread count for a CPU call (pure: every reading is an argument).

    ``current``: torch's thread count now; ``default``: torch's default (:func:`torch_default_threads`);
    ``pinned``: a count the application fixed (:func:`set_threads`), or None.
    """
    if pinned is not None:
        return Decision(None, f"set by the application ({pinned}; --threads or the torchrun share)")
    for name in THREAD_VARIABLES:
        if environ.get(name, "").strip():
            return Decision(None, f"{name}={environ[name].strip()} set by the user")
    if current != default:
        return Decision(None, f"torch.set_num_threads({current}) by the user (torch's default here is {default})")
    if others is None:
        return Decision(None, "no runnable-thread count on this system: torch's default")
    threads = choose_threads(cpus, others, default)
    return Decision(threads, f"{cpus} CPUs, {others:g} other runnable threads: {threads}", cpus=cpus, others=others)


# ------------------------------------------------------------------------------------------ application

_lock = threading.Lock()
_pinned: int | None = None
_cached: tuple[float, int, float | None] | None = None
_last: Decision | None = None
_depth = threading.local()


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count for every call (``--threads``, the torchrun share), or with None return to
    the policy. Pinning calls ``torch.set_num_threads``."""
    global _pinned, _cached
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        import torch

        torch.set_num_threads(threads)
    with _lock:
        _pinned, _cached = threads, None


def _readings() -> tuple[int, float | None]:
    """``(usable CPUs, other runnable threads)``, sampled again once :data:`REUSE_S` has passed."""
    global _cached
    now = time.monotonic()
    with _lock:
        cached = _cached
    if cached is not None and now - cached[0] < REUSE_S:
        return cached[1], cached[2]
    cpus, others = usable_cpus(), runnable_others()
    with _lock:
        _cached = (now, cpus, others)
    return cpus, others


def _current_decision(current: int) -> Decision:
    with _lock:
        pinned = _pinned
    if pinned is not None or any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES):
        cpus, others = 0, None  # the user's setting: nothing to read
    else:
        cpus, others = _readings()
    return decide(current=current, default=torch_default_threads(), cpus=cpus, others=others, pinned=pinned,
                  environ=os.environ)


@contextmanager
def policy(device: Any = "cpu") -> Iterator[Decision]:
    """torch's CPU threads set by the policy for the block (on a CPU ``device``), restored afterwards."""
    global _last
    import torch

    if torch.device(device).type != "cpu" or getattr(_depth, "value", 0):
        yield Decision(None, "not a CPU call" if torch.device(device).type != "cpu" else "inside a policy block")
        return
    current = torch.get_num_threads()
    decision = _current_decision(current)
    _last = decision
    changed = decision.threads is not None and decision.threads != current
    _depth.value = 1
    try:
        if changed:
            torch.set_num_threads(decision.threads)
        yield decision
    finally:
        _depth.value = 0
        if changed:
            torch.set_num_threads(current)


def last_decision() -> dict[str, Any] | None:
    """The decision of the latest CPU call in this process (benchmarks record it), or None."""
    return None if _last is None else _last.as_dict()


# ---------------------------------------------------------------------------------------------- waiting


def wait_policy(environ: Mapping[str, str], cpus: int, torch_loaded: bool) -> dict[str, str]:
    """The OpenMP wait settings to add to ``environ`` (pure): none when the user set one, or when torch is
    loaded already (too late: the runtime has read them)."""
    if torch_loaded or any(environ.get(name, "").strip() for name in WAIT_VARIABLES):
        return {}
    if cpus <= 1:
        return {}  # one thread: no team, nothing waits
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy for this process (see the module docstring); returns what it set. Call it
    before torch is imported; ``esc-sr`` does, first thing."""
    env = os.environ if environ is None else environ
    chosen = wait_policy(env, usable_cpus(), "torch" in sys.modules)
    env.update(chosen)
    return chosen
