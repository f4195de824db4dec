"""ESC ×4 on CPU against the official implementation, same weights, same run, idle and loaded.

    python -m benchmarks official_cpu --official-repo /path/to/dslisleedh-ESC      # a clone (or bare mirror)
    python -m benchmarks official_cpu --official-repo REPO --conditions loaded --runs 3
    python -m benchmarks official_cpu --official-repo REPO --pause-pid 1234 --pause-pid 1240   # idle: stop them

**The official code** is taken at run time from a local clone of ``dslisleedh/ESC``: ``git show
COMMIT:esc/archs/esc_arch.py`` (``--commit``, default the golden fixtures' commit ``e7e6938``) into a temporary
folder that is deleted afterwards; nothing of it is written into this repository. It imports BasicSR's
``ARCH_REGISTRY`` and einops (``esc_sr.torchvision_shim`` makes BasicSR importable without torchvision's C++ operators).
It runs with ``attn_type='Naive'``, its only CPU path (its ``SDPA`` branch forces a CUDA-only kernel, ``Flex``
needs ``torch.compile`` and a compiler), in eval mode under ``torch.inference_mode()``. Without the clone (or
without git) the benchmark says so and skips only the official row; ours still runs.

**Same weights.** Both sides load ``../shared/fixtures/golden/esc_x4.ckpt.pth`` (``params_ema``; ``--weights``):
the official model through its own ``load_state_dict``, ours through ``esc_arch.load_model``. Before timing, the
outputs on the benchmark's input are compared: ours bare ``model(x)`` against the official output, and
``esc_sr.upscale(model, x)`` against the official model run as upscale runs a model (the ESC paper's protocol:
the image reflect-padded to a multiple of the window, the output cropped back and, here, clamped to [0, 1]);
both must agree within 1e-4, the golden fixtures' tolerance, or the run stops.

**What is timed**, each call on one 180×320 input (``--size``; 720×1280 out):

- ``ours upscale``: ``esc_sr.upscale(model, x)``, the library's default path (``tile='auto'``, which runs this
  size untiled; it fuses a copy of the model per call and applies the CPU thread policy of
  :mod:`esc_sr.threads` to the call);
- ``ours batch``: the same call in a worker that, as a batch host does (``esc-sr upscale`` over a folder, a
  script's loop), keeps one :func:`esc_sr.heap.reusing_freed_memory` scope open around all its calls, so each call
  reuses the memory the one before freed; ``ours upscale`` gives it back when each call returns (the right thing
  for a host such as ComfyUI), and its next call faults it in again;
- ``ours bare``: ``esc_runtime.prepare(model)(x)`` on the same loaded (unfused) model, torch's thread setting as it
  is (before issue 29 the model's own ``model(x)`` took the fast paths; now the plain model is plain PyTorch);
- ``official``: the official model's ``model(x)``.

**Processes.** Each implementation runs in its own fresh, long-lived worker process, and the parent alternates
calls between them (each entry's first call is the agreement check; then ``--warmup`` untimed and ``--runs``
timed rounds per condition in rotating order: round *i* starts with a different entry), so load drift hits all
rows alike. Separate processes because the state that matters here is
per process: the OpenMP runtime reads its wait policy once, when torch loads it; the thread team and the
allocator's cached memory are kept between calls. In one process both would share one wait policy and one
team, and one side's allocations would shape the other's. The official worker runs with torch's defaults, as
an official user gets; ours starts as ``esc-sr`` does (:func:`esc_sr.threads.configure_environment` before
torch is imported). A waiting worker blocks on a pipe read, its OpenMP threads asleep after their short spin.

**Conditions** (``--conditions``): ``idle`` and ``loaded``. Idle: nothing else should run; ``--pause-pid PID``
stops those processes with SIGSTOP for the idle condition only and always resumes them (SIGCONT, also on an
error or Ctrl-C). Loaded: the benchmark starts another job itself, a process doing 2-thread torch matmuls
(``--load-threads``) beside everything else, and stops it afterwards. Both conditions record the runnable
threads (``/proc/loadavg``) sampled during the runs, and the load average.

Writes ``benchmarks/results/official_cpu.json`` (every time, thread choices, machine) and ``official_cpu.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .common import (  # no torch at import: ours must configure its threads before torch loads
    GOLDEN_DIR, REPO_ROOT, RESULTS_DIR, cpu_model, load_average, log, parse_size, write_json_atomic, write_text_atomic,
)

GOLDEN_COMMIT = "e7e6938c52ff6c393fe52660df9e00cc2c975db1"
OFFICIAL_FILE = "esc/archs/esc_arch.py"
DEFAULT_WEIGHTS = GOLDEN_DIR / "esc_x4.ckpt.pth"
# The official constructor, base configuration (../shared/spec/esc_architecture.md; golden case esc_x4).
OFFICIAL_KWARGS = dict(dim=64, pdim=16, kernel_size=13, n_blocks=5, conv_blocks=5, window_size=32, num_heads=4,
                       exp_ratio=1.25, attn_type="Naive", upscaling_factor=4)
TOLERANCE = 1e-4
ENTRIES = ("ours_upscale", "ours_batch", "ours_bare", "official")
#: Which worker process serves each entry (the heap scope is process-wide: the batch entry needs its own).
WORKER_OF = {"ours_upscale": "ours", "ours_bare": "ours", "ours_batch": "ours_batch", "official": "official"}


# ------------------------------------------------------------------------------------------- official code


def extract_official(repo: Path, commit: str, folder: Path) -> Path | str:
    """``esc_arch.py`` of the official repository at ``commit``, written into ``folder``; or why it cannot be."""
    if not repo.exists():
        return f"no clone of dslisleedh/ESC at {repo}"
    try:
        text = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{OFFICIAL_FILE}"], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError:
        return "git is not installed"
    except subprocess.CalledProcessError as exc:
        return f"git show {commit}:{OFFICIAL_FILE} in {repo} failed: {' '.join(exc.stderr.split())[:200]}"
    path = folder / "esc_official_arch.py"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ workers


def _input(size: tuple[int, int]) -> Any:
    import torch

    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))


def _build_ours(weights: Path) -> dict[str, Any]:
    import torch

    import esc_arch
    import esc_sr
    from esc_sr import threads

    import esc_runtime

    model = esc_arch.load_model(str(weights)).eval()
    prepared = esc_runtime.prepare(model)  # the plain model, each layer on the runtime's implementation
    state: dict[str, Any] = {"model": model, "decisions": []}

    def upscale(x: Any) -> Any:
        out = esc_sr.upscale(model, x)
        state["decisions"].append(threads.last_decision())
        return out

    def bare(x: Any) -> Any:
        with torch.inference_mode():
            return prepared(x)

    state["calls"] = {"ours_upscale": upscale, "ours_batch": upscale, "ours_bare": bare}
    return state


def _build_official(path: Path, weights: Path) -> dict[str, Any]:
    import importlib.util

    import torch

    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()  # basicsr imports torchvision, whose C++ operators a CPU wheel may lack
    spec = importlib.util.spec_from_file_location("esc_official_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = time.perf_counter()
    model = module.ESC(**OFFICIAL_KWARGS)
    build_s = time.perf_counter() - started  # the Naive path builds its bias index tables in Python loops
    checkpoint = torch.load(str(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["params_ema"] if "params_ema" in checkpoint else checkpoint)
    model.eval()

    def official(x: Any) -> Any:
        with torch.inference_mode():
            return model(x)

    def official_padded(x: Any) -> Any:
        """The ESC paper's evaluation protocol, which esc_sr.upscale follows: the image reflect-padded on the
        right and bottom to a multiple of the window, the output cropped back."""
        h, w, window = x.shape[-2], x.shape[-1], OFFICIAL_KWARGS["window_size"]
        padded = torch.nn.functional.pad(x, (0, (-w) % window, 0, (-h) % window), mode="reflect")
        return official(padded)[..., : h * OFFICIAL_KWARGS["upscaling_factor"], : w * OFFICIAL_KWARGS["upscaling_factor"]]

    return {"calls": {"official": official, "official_padded": official_padded}, "build_s": build_s}


def worker(kind: str, args: argparse.Namespace) -> int:
    """A worker process: build the model, then answer the parent's commands on stdin, one JSON line each."""
    ours = kind in ("ours", "ours_batch")
    if ours:
        from esc_sr import threads

        environment = threads.configure_environment()  # what esc-sr's entry does, before torch is imported
    import torch

    scope = contextlib.ExitStack()
    if ours:
        state = _build_ours(Path(args.weights))
        state["environment"] = environment
        if kind == "ours_batch":
            from esc_sr import heap

            scope.enter_context(heap.reusing_freed_memory())  # open for the worker's life, as esc-sr's loop does
    else:
        state = _build_official(Path(args.official_file), Path(args.weights))
    x = _input(tuple(args.size))
    reply = {"ready": True, "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
             "environment": state.get("environment"), "build_s": state.get("build_s"),
             "wait_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}
    print(json.dumps(reply), flush=True)
    with scope:
        _answer_commands(state, x)
    return 0


def _answer_commands(state: dict[str, Any], x: Any) -> None:
    import torch

    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        fn = state["calls"][command["entry"]]
        started = time.perf_counter()
        out = fn(x)
        seconds = time.perf_counter() - started
        answer: dict[str, Any] = {"seconds": seconds, "torch_threads_after": torch.get_num_threads()}
        if command["entry"] in ("ours_upscale", "ours_batch"):
            answer["decision"] = state["decisions"][-1]
        if command.get("save"):
            torch.save(out.contiguous(), command["save"])
        print(json.dumps(answer), flush=True)


class Worker:
    """The parent's handle on one worker process (JSON lines over its stdin/stdout; its stderr is passed on)."""

    def __init__(self, kind: str, args: argparse.Namespace, official_file: Path | None):
        command = [sys.executable, "-m", "benchmarks.official_cpu", "--worker", kind, "--size",
                   f"{args.size[0]}x{args.size[1]}", "--weights", str(args.weights)]
        if official_file is not None:
            command += ["--official-file", str(official_file)]
        self.kind = kind
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker stopped (exit status {self.process.wait()}): see above")
        return json.loads(line)

    def run(self, entry: str, save: Path | None = None) -> dict[str, Any]:
        self.process.stdin.write(json.dumps({"op": "run", "entry": entry, "save": str(save) if save else None}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------------------- conditions


def load_job(threads: int) -> int:
    """The loaded condition's other job: torch matmuls on ``threads`` threads, until killed."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    while True:
        a @ b


@contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the block; SIGCONT them afterwards, whatever happens (also on SIGTERM)."""
    stopped: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def resume() -> None:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def on_term(signum: int, frame: Any) -> None:
        resume()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        if stopped:
            log(f"paused {stopped} (SIGSTOP) for the idle condition")
        yield
    finally:
        resume()
        signal.signal(signal.SIGTERM, previous)
        if stopped:
            log(f"resumed {stopped} (SIGCONT)")


@contextmanager
def loaded(threads: int) -> Iterator[int]:
    """Another job running beside the benchmark for the block: a ``threads``-thread torch matmul loop."""
    # A session of its own, as another user's job: with Linux's autogroup scheduling each session gets an equal
    # share of the CPU, and a child in the benchmark's own session would compete only inside its share.
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.official_cpu", "--worker", "load",
                                "--load-threads", str(threads)], cwd=REPO_ROOT, start_new_session=True)
    try:
        time.sleep(3.0)  # torch imported and its threads busy
        yield process.pid
    finally:
        process.kill()
        process.wait()


class RunnableSampler:
    """Samples the system's runnable-thread count (``/proc/loadavg``'s 4th field) every 0.5 s in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with open("/proc/loadavg") as handle:
                    self.samples.append(int(handle.read().split()[3].split("/")[0]))
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> RunnableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        ordered = sorted(self.samples)
        return {"samples": len(ordered), "median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


def _max_abs(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def check_agreement(workers: dict[str, Worker], folder: Path) -> dict[str, Any]:
    """Max |difference| of ours against the official output on the benchmark's input: bare ``model(x)`` against
    the official ``model(x)``; ``esc_sr.upscale`` (which pads the image to the window, as the ESC paper evaluates,
    and clamps) against the official model run the same way (one extra, untimed official call)."""
    import torch

    outputs = {}
    calls = list(workers.items()) + ([("official_padded", workers["official"])] if "official" in workers else [])
    for entry, worker_ in calls:
        path = folder / f"{entry}.pt"
        worker_.run(entry, save=path)
        outputs[entry] = torch.load(path)
    result: dict[str, Any] = {"tolerance": TOLERANCE}
    if "official" in outputs:
        result["ours_bare_vs_official"] = _max_abs(outputs["ours_bare"], outputs["official"])
        for entry in ("ours_upscale", "ours_batch"):
            result[f"{entry}_vs_official_padded_clamped"] = _max_abs(outputs[entry], outputs["official_padded"].clamp(0, 1))
        result["ok"] = max(v for k, v in result.items() if k.endswith("official") or k.endswith("clamped")) <= TOLERANCE
    return result


def measure(workers: dict[str, Worker], runs: int, warmup: int) -> dict[str, Any]:
    """``warmup`` untimed rounds, then ``runs`` rounds, each calling every entry once, the order rotating per
    round. Every entry's first call (lazy initialisation) was the agreement check's."""
    entries = [e for e in ENTRIES if e in workers]
    for _ in range(warmup):
        for entry in entries:
            workers[entry].run(entry)
    times: dict[str, list[float]] = {e: [] for e in entries}
    decisions: dict[str, list[Any]] = {e: [] for e in entries if e in ("ours_upscale", "ours_batch")}
    started = time.perf_counter()
    with RunnableSampler() as sampler:
        for index in range(runs):
            order = entries[index % len(entries):] + entries[:index % len(entries)]
            for entry in order:
                answer = workers[entry].run(entry)
                times[entry].append(answer["seconds"])
                if "decision" in answer:
                    decisions[entry].append(answer["decision"])
            log(f"round {index + 1}/{runs}: " + ", ".join(f"{e} {times[e][-1]:.2f} s" for e in entries))
    medians = {e: statistics.median(v) for e, v in times.items()}
    result: dict[str, Any] = {"runs": runs, "warmup_rounds": warmup, "seconds": times, "median_s": medians,
                              "min_s": {e: min(v) for e, v in times.items()}, "wall_s": time.perf_counter() - started,
                              "runnable_threads": sampler.summary(), "load_average": load_average(),
                              "thread_decisions": decisions}
    if "official" in medians:
        result["ratio_vs_official"] = {e: medians[e] / medians["official"] for e in entries if e != "official"}
        result["per_round_ratio_vs_official"] = {
            e: [a / b for a, b in zip(times[e], times["official"])] for e in entries if e != "official"}
    return result


# ------------------------------------------------------------------------------------------------ report


GOALS = {"idle": 0.15, "loaded": 0.35}  # issue 15, item 3: ours / official


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# ESC ×4 on CPU: ours against the official implementation",
        "",
        f"Input {payload['size'][0]}×{payload['size'][1]} (×4 → {payload['size'][0] * 4}×{payload['size'][1] * 4}), "
        f"batch 1, fp32, golden `esc_x4` weights in both; official `dslisleedh/ESC` at `{payload['commit'][:7]}`, "
        "attn_type='Naive' (its only CPU path). Each implementation in its own worker process, calls alternating "
        "(rotating order); first calls were the agreement check; medians.",
        "",
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cpus']} CPUs; torch {payload['machine']['torch']}; "
        f"{payload['machine']['started_utc']}.",
        "",
    ]
    if payload.get("official_skipped"):
        lines += [f"**Official row skipped**: {payload['official_skipped']}.", ""]
    agreement = payload.get("agreement", {})
    if "ours_bare_vs_official" in agreement:
        lines += [f"Agreement: max |ours − official| = {agreement['ours_bare_vs_official']:.2e} (bare), "
                  f"{agreement['ours_upscale_vs_official_padded_clamped']:.2e} (upscale), "
                  f"{agreement['ours_batch_vs_official_padded_clamped']:.2e} (batch; both against the official model "
                  "on the window-padded image, cropped and clamped, the paper's protocol that upscale follows); "
                  f"tolerance {TOLERANCE:g}.", ""]
    ours = ("ours_upscale", "ours_batch", "ours_bare")
    lines += ["| condition | runs | ours upscale (s) | ours batch (s) | ours bare (s) | official (s) | upscale / official "
              "| batch / official | bare / official | goal | met (upscale / batch / bare) | ours threads "
              "| runnable threads (median) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    times = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    for name, cond in payload["conditions"].items():
        med = cond["median_s"]
        ratio = cond.get("ratio_vs_official", {})
        decisions = [d for calls in cond["thread_decisions"].values() for d in calls]
        chosen = sorted({d["threads"] for d in decisions if d and d.get("threads")})
        kept = any(d and d.get("threads") is None for d in decisions)
        goal = GOALS.get(name)
        met = " / ".join("—" if entry not in ratio or goal is None else ("yes" if ratio[entry] <= goal else "**no**")
                         for entry in ours)
        lines.append(
            f"| {name} | {cond['runs']} | " + " | ".join(fmt(med.get(e)) for e in ours + ("official",)) + " | "
            + " | ".join(times(ratio.get(e)) for e in ours) + " | "
            f"≤ {goal}× | {met} | {', '.join(map(str, chosen + (['as set'] if kept else []))) or '—'} | "
            f"{cond['runnable_threads'].get('median', '—')} |")
    lines += ["", "Runnable threads: the machine's count (`/proc/loadavg`) every 0.5 s during the rounds, the sampling "
              "thread and the worker that runs included. Ours threads: what `esc_sr.threads` chose per upscale call "
              "(upscale and batch).",
              "", "Workers: " + "; ".join(f"{k}: {v}" for k, v in payload["workers"].items()), ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, default=None,
                        help="a local clone (or bare mirror) of github.com/dslisleedh/ESC")
    parser.add_argument("--commit", default=GOLDEN_COMMIT, help="official commit (default: the golden fixtures')")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="BasicSR checkpoint of ESC x4")
    parser.add_argument("--size", type=parse_size, default=(180, 320), help="LR input HxW (default 180x320)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per condition (default 5)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed rounds per condition (default 0: each entry's first call was the agreement check)")
    parser.add_argument("--conditions", nargs="+", choices=["idle", "loaded"], default=["idle", "loaded"])
    parser.add_argument("--load-threads", type=int, default=2, help="threads of the loaded condition's job")
    parser.add_argument("--pause-pid", type=int, action="append", default=[],
                        help="a process to SIGSTOP during the idle condition only (resumed afterwards); repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for official_cpu.json / .md")
    parser.add_argument("--worker", choices=["ours", "ours_batch", "official", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--official-file", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker == "load":
        return load_job(args.load_threads)
    if args.worker:
        return worker(args.worker, args)

    import platform

    import torch

    payload: dict[str, Any] = {
        "benchmark": "official_cpu", "size": list(args.size), "commit": args.commit, "weights": str(args.weights),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "parallel": torch.__config__.parallel_info().splitlines()[-1].strip(),
                    "load_average_at_start": load_average(),
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "conditions": {}, "workers": {},
    }
    with tempfile.TemporaryDirectory(prefix="esc-official-") as temp:
        folder = Path(temp)
        official_file: Path | None = None
        if args.official_repo is None:
            payload["official_skipped"] = "no --official-repo given (a clone of github.com/dslisleedh/ESC)"
        else:
            found = extract_official(args.official_repo.expanduser(), args.commit, folder)
            if isinstance(found, str):
                payload["official_skipped"] = found
            else:
                official_file = found
        if payload.get("official_skipped"):
            log(f"official row skipped: {payload['official_skipped']}")
        workers: dict[str, Worker] = {}
        try:
            log("starting the workers (the official Naive model builds its index tables for a minute or so)")
            kinds = ["ours", "ours_batch"] + (["official"] if official_file is not None else [])
            by_kind = {kind: Worker(kind, args, official_file if kind == "official" else None) for kind in kinds}
            workers.update({entry: by_kind[kind] for entry, kind in WORKER_OF.items() if kind in by_kind})
            payload["workers"] = {w.kind: w.info for w in {id(w): w for w in workers.values()}.values()}
            payload["agreement"] = check_agreement(workers, folder)
            log(f"agreement: {payload['agreement']}")
            if payload["agreement"].get("ok") is False:
                raise SystemExit(f"ours and the official outputs differ by more than {TOLERANCE}: {payload['agreement']}")
            for condition in args.conditions:
                log(f"condition {condition}: {args.runs} rounds")
                if condition == "idle":
                    with paused(args.pause_pid):
                        result = measure(workers, args.runs, args.warmup)
                else:
                    with loaded(args.load_threads) as pid:
                        result = measure(workers, args.runs, args.warmup)
                        result["load_job"] = {"pid": pid, "threads": args.load_threads, "kind": "torch 1024² matmuls"}
                payload["conditions"][condition] = result
                log(f"{condition}: medians {result['median_s']}; ratios {result.get('ratio_vs_official')}")
        finally:
            for worker_ in {id(w): w for w in workers.values()}.values():
                worker_.close()
    payload["machine"]["load_average_at_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "official_cpu"
    write_json_atomic(args.out / f"{name}.json", payload)
    write_text_atomic(args.out / f"{name}.md", markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
