"""CPU threads for the model: how many torch uses, chosen per call from the machine's state, and how they wait.

Why. An ESC forward pass on a CPU is some 700 operators (convolutions, the window attention, GELU, adds, layout
copies; at 180×320 a few milliseconds each), every one ending at an OpenMP barrier. When another process holds
one of the cores, the team thread that shares that core runs at a fraction of its speed and every operator waits
for it, while the team's other threads *spin* at the barrier (GNU OpenMP's default) and keep their core busy
doing nothing, so the scheduler cannot move the other process onto it. Linux's autogroup scheduling (on by default
on desktops and on the development VM) gives each session an equal share of the CPU whatever its nice value, so
even a ``nice 10`` training run takes a core's worth from us.

Measured on the 2-core AMD EPYC development VM (torch 2.13 CPU wheel, GNU OpenMP; ESC ×4, 180×320 input, the
golden weights, fused; one long-lived process per setting, calls interleaved; wall / CPU seconds per forward,
medians of 3 rounds, idle: the 2 rounds in which nothing else ran):

===================================  ==================  ==================  =================
other work on the machine            2 threads, spin     2 threads, PASSIVE  1 thread
===================================  ==================  ==================  =================
none (the training job stopped)      4.4-5.3 / 8.5-9.1   4.3-4.4 / 7.6-7.8   7.3-7.5 / 7.2-7.4
a 1-thread training job (nice 10)    11.6 / 11.6         6.9 / 6.9           7.5 / 7.2
that, and a 2-thread matmul job      18.4 / 12.0         11.6 / 7.5          11.7 / 7.6
===================================  ==================  ==================  =================

So spinning costs 1.6× as soon as anything else runs (the issue's "2.5× slower under load"); passive waiting
costs nothing measurable on an idle machine (4.27 and 4.39 s against 5.26 and 4.41 s; a futex wake-up takes
microseconds, the operators milliseconds); and a thread count that leaves the busy cores to the others is as
fast as passive waiting with every core (7 % and 1 % slower), whatever the wait policy, in fewer CPU-seconds,
which leaves the other jobs more. The profiler (2 threads under load, spin against PASSIVE) puts the spinning
cost in the short operators: copies 2.4×, element-wise 1.7×, convolutions 1.4×, while the ten long attention
calls are not slower. With autogroup, more threads do not buy a larger share of the CPU either: the session
gets one share, split over its threads.

The policy, for a model call on the CPU (:func:`scoped`, applied by :func:`esc_sr.upscale` to each image plane):

* **Threads** = the CPUs this process may use (:func:`usable_cpus`: its affinity mask, a cgroup CPU quota) minus
  the threads of *other* processes that are runnable now (:func:`runnable_others`: the kernel's runnable count in
  ``/proc/loadavg``, minus this process's own running threads, the median of 5 samples 2 ms apart, about
  10 ms), at least 1 and at most torch's default (the physical cores). Counted again for every call (reused for
  at most :data:`REUSE_S` seconds, for many small images), so a batch follows the machine as other jobs start
  and stop; torch's own setting is restored when the call returns. It is the rule that does not depend on the
  wait policy: a library user whose OpenMP spins (torch loaded before esc_sr could choose) gets the 1.6×.
* **The user's setting wins**, and the policy then leaves torch's thread count alone: ``--threads N`` and the
  torchrun share of :mod:`esc_sr.sharding` (both through :func:`set_threads`); ``OMP_NUM_THREADS`` or
  ``MKL_NUM_THREADS`` in the environment; and a ``torch.set_num_threads(n)`` call, seen as a thread count other
  than torch's default (:func:`torch_default_threads`). A call of ``torch.set_num_threads`` with exactly the
  default value cannot be told from the default: call :func:`set_threads` to pin any value.
* **Waiting** (:func:`configure_environment`, called by ``esc-sr`` first thing, before torch is imported):
  ``OMP_WAIT_POLICY=PASSIVE`` where the process may use more than one CPU, unless the user set
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. Not chosen from the load at start: a batch outlives it, passive
  waiting costs nothing idle, and the thread count, which is chosen per call, covers the rest. With one usable
  CPU there is no team and nothing to set.

Library users: :func:`esc_sr.upscale` applies the thread policy by itself. The wait policy can only be chosen
before torch is imported (the OpenMP runtime reads it once, when torch loads it): call
``esc_sr.threads.configure_environment()`` first thing in a program, or set ``OMP_WAIT_POLICY=PASSIVE`` in the
environment. ``set_threads(n)`` pins a count for every call, ``set_threads(None)`` returns to the policy.
``python -m benchmarks.official_cpu`` measures all of it against the official implementation.

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
           "set_threads", "scoped", "policy", "last_decision", "configure_environment", "wait_policy",
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


def _cgroup_quota() -> float | None:
    """The cgroup CPU limit in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None without one."""
    try:
        with open("/proc/self/cgroup") as handle:
            unified = next((line.strip().split("::", 1)[1] for line in handle if line.startswith("0::")), None)
    except OSError:
        unified = None
    candidates = []
    if unified is not None:
        candidates.append(("v2", f"/sys/fs/cgroup{unified.rstrip('/')}/cpu.max"))
    candidates += [("v2", "/sys/fs/cgroup/cpu.max"), ("v1", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")]
    for kind, path in candidates:
        try:
            with open(path) as handle:
                text = handle.read().split()
            if kind == "v2":
                return None if text[0] == "max" else int(text[0]) / int(text[1])
            quota = int(text[0])
            with open(path.replace("quota", "period")) as handle:
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
    ``samples`` taken ``interval`` seconds apart. When this process may use only some of the machine's CPUs
    (a container's cpuset), the others are taken as spread evenly over all of them.
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
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = online
    return others * mine / online if mine < online else others


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


def scoped(fn: F, device: Any) -> F:
    """``fn`` run under :func:`policy` for ``device``: what :func:`esc_sr.upscale` wraps each model run in."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with policy(device):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


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
