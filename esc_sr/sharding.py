"""``esc-sr upscale`` on several processes, one device each: the inputs are split between them.

    torchrun --standalone --nproc_per_node=2 --no-python esc-sr upscale photos/ -o out/

A process that torchrun starts (or any launcher that sets torch's variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) is one *rank* of the run. In
:func:`esc_sr.cli.upscale_command`, through a :class:`Session`:

1. Rank 0 checks the arguments, expands the inputs and plans every output, once, and sends the plan to the others
   (:meth:`Session.from_root`): every rank works from the same list even if a folder changes while the ranks start,
   and two inputs that would write one output are caught on the whole list, before it is split. Rank 0 also splits
   it (:meth:`Session.split`): each file goes to exactly one rank, balanced by pixels (:func:`assign`).
2. Each rank loads the model once, rank 0 first (:meth:`Session.root_first`): an official model is downloaded
   once, and a model that cannot be loaded is reported once. Devices: :meth:`Session.device` (``cuda:LOCAL_RANK``)
   and :meth:`Session.set_threads` (on CPU, each process its share of the cores).
3. Each rank upscales its files and reports each of their failures itself: no line is printed twice.
4. The ranks send their summaries to rank 0 (:meth:`Session.gather`), which prints the one summary and returns the
   run's exit status; a failed file on any rank makes it 1. The other ranks exit 0 once they have reported.

Without those variables (or with ``WORLD_SIZE=1``) a :class:`Session` is a single process and every method is the
trivial one; nothing of ``torch.distributed`` is imported.

There is no ``--processes N`` option: torchrun comes with every torch, and already does what such an option would
have to redo (free ports, starting and stopping the workers, passing on signals, one process per GPU, several
machines, per-rank logs with ``--log-dir``); esc-sr only has to play its part as a worker.
"""

from __future__ import annotations

import datetime
import heapq
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence, TypeVar

from esc_arch.errors import ESCError, printable

__all__ = ["Launch", "Session", "ShardingError", "RootFailed", "detect_launch", "assign", "estimate_cost",
           "cpu_threads", "LAUNCH_VARIABLES"]

T = TypeVar("T")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Why a gloo process group, and not none. What the ranks exchange is tiny (the plan, then one summary each) and
# needs no accelerator; gloo is in every torch build, CPU-only ones included, and works beside CUDA (NCCL would
# need a GPU per rank). Doing without a group would mean inventing a rendezvous: files in a shared folder (polling,
# stale files of killed runs, a rank that died looking like a slow one, forever) or a raw TCPStore (what the group
# is built on, minus failure detection). The group comes with the rendezvous torchrun prepared, and with failure
# detection: a rank that dies closes its sockets, and a collective waiting on it fails at once ("Connection closed
# by peer") instead of hanging; torchrun, besides, stops the other workers when one exits with an error. Objects
# travel pickled (broadcast_object_list / gather_object): the peers are this same program, started by one launcher.
#
# Two timeouts. Joining the group (the rendezvous) is bounded by STARTUP_TIMEOUT: torchrun starts every worker at
# once, so a peer that has not appeared by then never will. The exchanges run on a second group with
# EXCHANGE_TIMEOUT: the final one waits for the slowest rank, which can finish hours after the fastest on a big
# batch, and gloo's default of 30 minutes would fail the ranks that finished first. A rank that dies is detected at
# once anyway; this only bounds a rank that hangs while alive (or is stopped: SIGSTOP, a suspended job), so it can be
# set (WAIT_VARIABLE), and a rank waiting in an exchange says whom for, first after FIRST_REPORT_S, then every
# REPORT_EVERY_S: the ranks not yet at that exchange, from the check-ins each rank leaves in torchrun's store.
STARTUP_TIMEOUT = datetime.timedelta(minutes=10)
EXCHANGE_TIMEOUT = datetime.timedelta(days=7)
WAIT_VARIABLE = "ESC_SR_RANK_WAIT"
FIRST_REPORT_S, REPORT_EVERY_S = 60.0, 600.0
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def exchange_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long a rank waits in an exchange for the others: :data:`EXCHANGE_TIMEOUT`, or ``ESC_SR_RANK_WAIT`` (seconds,
    or a number with ``s``, ``m``, ``h`` or ``d``: ``90``, ``30m``, ``2h``)."""
    text = (os.environ if environ is None else environ).get(WAIT_VARIABLE, "").strip()
    if not text:
        return EXCHANGE_TIMEOUT
    found = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([smhd]?)", text.lower())
    if found is None or float(found.group(1)) <= 0:
        raise ShardingError(f"{WAIT_VARIABLE}={printable(text)!r} is not a duration (seconds, or a number with s, m, h "
                            "or d: 90, 30m, 2h)")
    return datetime.timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


class ShardingError(ESCError):
    """The launcher's variables are inconsistent, or the processes lost contact with each other (exit status 1)."""


class RootFailed(Exception):
    """Raised on the other ranks when rank 0 failed a step they wait for (checking the arguments, loading the model,
    planning): rank 0 prints why, and they stop quietly with ``status``, rank 0's exit status."""

    def __init__(self, status: int):
        super().__init__(f"rank 0 stopped with exit status {status}")
        self.status = status


# --------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch: its rank among ``world_size`` processes, and among the
    ``local_world_size`` of them on this machine. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch torchrun describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``.

    None of them set: a single process. A launcher that sets only ``RANK`` and ``WORLD_SIZE`` is taken as one
    machine (``LOCAL_RANK = RANK``, ``LOCAL_WORLD_SIZE = WORLD_SIZE``). Values that contradict each other are a
    :class:`ShardingError`: guessing would make ranks skip or repeat files.
    """
    env = os.environ if environ is None else environ
    if not any(name in env for name in LAUNCH_VARIABLES):
        return Launch()
    values: dict[str, int] = {}
    for name in LAUNCH_VARIABLES:
        if name in env:
            try:
                values[name] = int(env[name])
            except ValueError:
                raise ShardingError(f"{name}={printable(env[name])!r} is not a whole number (torchrun sets it)") from None
    world = values.get("WORLD_SIZE", 1)
    if world > 1 and "RANK" not in values:
        raise ShardingError(f"WORLD_SIZE={world} is set but RANK is not: start the processes with torchrun")
    launch = Launch(rank=values.get("RANK", 0), world_size=world,
                    local_rank=values.get("LOCAL_RANK", values.get("RANK", 0)),
                    local_world_size=values.get("LOCAL_WORLD_SIZE", world))
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size
            and launch.local_world_size <= launch.world_size):
        described = ", ".join(f"{name}={env[name]}" for name in LAUNCH_VARIABLES if name in env)
        raise ShardingError(f"inconsistent launch variables: {printable(described)}")
    return launch


def cpu_threads(launch: Launch, requested: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """Torch CPU threads for this process, or None to leave torch's own setting.

    ``requested`` (``--threads``) wins. A single process: None, and :mod:`esc_sr.threads` chooses the count for
    each image from the CPUs free at the time (``OMP_NUM_THREADS`` set by the user wins there too).
    Several processes get the cores this process may run on (its CPU affinity) divided among the processes of
    this machine, at least 1 each, so that N processes neither fight over the cores nor leave them idle; torchrun
    sets ``OMP_NUM_THREADS=1`` for its workers when the user did not set it, which would leave all but N cores
    idle. A value of 1 therefore cannot be told from torchrun's and is overridden (``--threads 1`` asks for one
    thread); any other value is the user's, and is kept.
    """
    if requested is not None:
        return requested
    if not launch.distributed:
        return None
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "1").strip() not in ("", "1"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // launch.local_world_size)


# ------------------------------------------------------------------------------------------- sharding


def assign(costs: Sequence[int], world_size: int) -> list[int]:
    """The rank of each item: every item goes to exactly one of ``world_size`` ranks, their total costs as even as
    the greedy "longest first" rule makes them: the busiest rank at most one item above the least busy one, and
    within 4/3 of the best possible split.

    The items, by decreasing cost (ties: list order), each go to the rank with the least total so far (ties: the
    lowest rank). Deterministic: the same costs give the same ranks on every machine. Equal costs give round robin.
    A cost below 1 counts as 1, so that files that cost nothing (they fail at once) are spread too.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    ranks = [0] * len(costs)
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (total cost so far, rank)
    for index in sorted(range(len(costs)), key=lambda i: (-max(1, costs[i]), i)):
        load, rank = heapq.heappop(loads)
        ranks[index] = rank
        heapq.heappush(loads, (load + max(1, costs[index]), rank))
    return ranks


def estimate_cost(path: Path) -> int:
    """What upscaling one file costs, for :func:`assign`: its pixel count (the model's time and the output's size
    grow with it), read from the header only. A format whose header only OpenCV reads: its size in bytes, a rough
    stand-in. A file whose header cannot be read fails in a moment: 1. Never raises: an estimate must not stop
    a run."""
    from . import images

    try:
        info = images.probe_image(path)
        return max(1, info.width * info.height) if info is not None else max(1, path.stat().st_size)
    except Exception:
        return 1


# -------------------------------------------------------------------------------------------- session


class Session:
    """This process's part in a run: its :class:`Launch` and, on several processes, the gloo group they share.

    Use it as a context manager (``with Session.start() as session:``): the group is joined on entry and left on
    exit, also when the run fails. For a single process every method is the trivial one.
    """

    def __init__(self, launch: Launch = Launch()):
        self.launch = launch
        self._group: Any = None  # the exchange group (exchange_timeout()), on several processes
        self._owns_default_group = False
        self._timeout = EXCHANGE_TIMEOUT
        self._exchanges = 0  # exchanges so far: every rank makes the same ones, in the same order

    @classmethod
    def start(cls, environ: Mapping[str, str] | None = None) -> Session:
        """The session the environment describes (:func:`detect_launch`), with its group joined."""
        session = cls(detect_launch(environ))
        if session.launch.distributed:
            session._join()
        return session

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_root(self) -> bool:
        return self.launch.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    @property
    def label(self) -> str:
        """``"rank 1 of 2: "`` on several processes (for what a rank says about itself alone), else ``""``."""
        return f"rank {self.launch.rank} of {self.launch.world_size}: " if self.distributed else ""

    # -- devices

    def device(self, requested: str) -> str:
        """The device this rank runs on. On several processes ``auto`` and a bare ``cuda`` mean this rank's GPU,
        ``cuda:LOCAL_RANK`` (modulo the GPUs there are, when more processes than GPUs share a machine), which also
        becomes torch's current device; a device the user named otherwise (``cpu``, ``cuda:1``) is kept."""
        if not self.distributed or requested not in ("auto", "cuda"):
            return requested
        import torch

        if not torch.cuda.is_available():
            return requested
        index = self.launch.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"

    def set_threads(self, requested: int | None, device_type: str) -> int | None:
        """Set torch's CPU threads (:func:`cpu_threads`) and return them, pinned for the whole run
        (:func:`esc_sr.threads.set_threads`); None where the per-call policy of :mod:`esc_sr.threads` decides.
        On an accelerator only ``--threads`` changes them: the CPU then decodes and encodes images only."""
        threads = cpu_threads(self.launch, requested) if requested is not None or device_type == "cpu" else None
        if threads is not None:
            from . import threads as cpu_policy

            cpu_policy.set_threads(threads)  # pinned: esc_sr.threads' per-call choice leaves it alone
        return threads

    # -- exchanges

    def from_root(self, compute: Callable[[], T], *, exit_status: Callable[[BaseException], int]) -> T:
        """``compute()`` on rank 0, its value sent to every rank. If it raises, rank 0 raises (and reports) the
        error, and the other ranks raise :class:`RootFailed` with ``exit_status(error)``."""
        if not self.distributed:
            return compute()
        if self.is_root:
            value = self._run_on_root(compute, exit_status)
            self._broadcast((True, value))
            return value
        return self._receive()

    def root_first(self, compute: Callable[[], T], *, exit_status: Callable[[BaseException], int]) -> T:
        """``compute()`` on every rank, rank 0 first and the others once it succeeded (a download then happens
        once, and an error is reported once: the others raise :class:`RootFailed`). The value is not sent."""
        if not self.distributed:
            return compute()
        if self.is_root:
            value = self._run_on_root(compute, exit_status)
            self._broadcast((True, None))
            return value
        self._receive()
        return compute()

    def split(self, make: Callable[[], Sequence[T]], cost: Callable[[T], int], *,
              exit_status: Callable[[BaseException], int]) -> tuple[list[T], list[T]]:
        """``(every item, this rank's items)``: rank 0 makes the list, costs each item and assigns it to one rank
        (:func:`assign`); every rank receives the list and the assignment. This rank's items keep the list order.
        A single process does not cost the items."""
        if not self.distributed:
            items = list(make())
            return items, items

        def plan() -> tuple[list[T], list[int]]:
            items = list(make())
            return items, assign([cost(item) for item in items], self.launch.world_size)

        items, ranks = self.from_root(plan, exit_status=exit_status)
        return items, [item for item, rank in zip(items, ranks) if rank == self.rank]

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value``, in rank order, on rank 0; None on the others. Every rank must call it, also one
        whose files all failed (a failed file is an outcome, not an exception), or rank 0 waits for it."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.launch.world_size if self.is_root else None
        try:
            self._exchange(lambda: dist.gather_object(value, parts, dst=0, group=self._group))
        except RuntimeError as exc:
            raise self._lost(exc) from None
        return parts

    def close(self) -> None:
        """Leave the group (idempotent). The default group is destroyed only if this session created it."""
        if self._group is None:
            return
        import torch.distributed as dist

        group, self._group = self._group, None
        if self._owns_default_group:
            dist.destroy_process_group()  # and every group made from it
        else:
            dist.destroy_process_group(group)

    # -- internals

    def _join(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise ShardingError("this torch build has no torch.distributed: run a single process")
        self._timeout = exchange_timeout()

        def join() -> None:
            if not dist.is_initialized():  # env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), set by torchrun
                dist.init_process_group(backend="gloo", timeout=STARTUP_TIMEOUT)
                self._owns_default_group = True
            elif (dist.get_rank(), dist.get_world_size()) != (self.rank, self.launch.world_size):
                raise ShardingError(f"the process group in place (rank {dist.get_rank()} of {dist.get_world_size()}) "
                                    f"is not the one RANK and WORLD_SIZE describe")
            self._group = dist.new_group(backend="gloo", timeout=self._timeout)

        try:  # a rank stopped before joining holds the others here, up to STARTUP_TIMEOUT: they say so meanwhile
            self._reporting(join, lambda waited: f"waiting for the other ranks to join for {waited} (at most "
                                                 f"{_duration(STARTUP_TIMEOUT.total_seconds())})")
        except (RuntimeError, ValueError) as exc:
            if self._owns_default_group:
                dist.destroy_process_group()
                self._owns_default_group = False
            raise ShardingError(f"rank {self.rank} of {self.launch.world_size}: cannot join the other processes "
                                f"({_reason(exc)})") from None

    def _run_on_root(self, compute: Callable[[], T], exit_status: Callable[[BaseException], int]) -> T:
        try:
            return compute()
        except Exception as exc:  # KeyboardInterrupt is not announced: the others are interrupted too, or torchrun stops them
            try:
                self._broadcast((False, exit_status(exc)))
            except ShardingError:
                pass  # the others are gone already; rank 0's own error is the one to report
            raise

    def _receive(self) -> Any:
        ok, value = self._broadcast(None)
        if not ok:
            raise RootFailed(value)
        return value

    def _broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        try:
            self._exchange(lambda: dist.broadcast_object_list(box, src=0, group=self._group))
        except RuntimeError as exc:
            raise self._lost(exc) from None
        return box[0]

    def _exchange(self, collective: Callable[[], Any]) -> Any:
        """``collective()``, this rank's part in an exchange, saying on stderr after :data:`FIRST_REPORT_S`, then every
        :data:`REPORT_EVERY_S`, whom it still waits for: rank 0 (for the other ranks; every exchange goes through
        it), or, on rank 0, the ranks that have not checked in at this exchange in the launcher's store."""
        self._exchanges += 1
        key = f"esc-sr/exchange-{self._exchanges}/rank-"
        store = self._store()
        try:
            if store is not None:
                store.set(key + str(self.rank), "here")
        except Exception:  # noqa: BLE001 - the store only names the late ranks; the exchange does not need it
            store = None

        def late() -> str:
            if not self.is_root:
                return "rank 0"
            try:
                missing = [rank for rank in range(1, self.launch.world_size) if not store.check([key + str(rank)])]
            except Exception:  # noqa: BLE001 - no store, or it does not answer
                return "the other ranks"
            if not missing:  # all reached this exchange: one of them stopped inside it
                return "the other ranks (all have reached this exchange)"
            return f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}"

        limit = f"a rank that is stopped, not dead, holds the others up to {_duration(self._timeout.total_seconds())} " \
                f"({WAIT_VARIABLE} sets it)"
        return self._reporting(collective, lambda waited: f"waiting for {late()} for {waited}; {limit}")

    def _reporting(self, wait: Callable[[], T], say: Callable[[str], str]) -> T:
        """``wait()``, printing ``say(time waited)`` on stderr after :data:`FIRST_REPORT_S`, then every
        :data:`REPORT_EVERY_S`, until it returns."""
        done, started = threading.Event(), time.monotonic()

        def report() -> None:
            delay = FIRST_REPORT_S
            while not done.wait(delay):
                print(printable(f"esc-sr upscale: {self.label}{say(_duration(time.monotonic() - started))}"),
                      file=sys.stderr, flush=True)
                delay = REPORT_EVERY_S

        reporter = threading.Thread(target=report, name="esc-sr-waiting", daemon=True)
        reporter.start()
        try:
            return wait()
        finally:
            done.set()
            reporter.join(timeout=1)

    def _store(self) -> Any:
        """torchrun's store (the rendezvous's), where the ranks check in at each exchange; None without one."""
        try:
            from torch.distributed import distributed_c10d

            return distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - a private function of torch: without it the messages name no rank
            return None

    def _lost(self, exc: BaseException) -> ShardingError:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            return ShardingError(f"rank {self.rank} of {self.launch.world_size}: gave up waiting for the other processes "
                                 f"after {_duration(self._timeout.total_seconds())} ({WAIT_VARIABLE}); one of them is "
                                 "stopped or hung: see its messages")
        return ShardingError(f"rank {self.rank} of {self.launch.world_size}: lost contact with the other processes "
                             f"({_reason(exc)}); one of them has probably stopped: see its messages")


def _reason(exc: BaseException) -> str:
    """gloo's messages start with a source location (``[.../pair.cc:553] Connection closed by peer ...``) and go
    on for several sentences: the first one, without the location."""
    text = " ".join(str(exc).split())
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return printable(text.split(". ")[0].rstrip(".") or type(exc).__name__)
