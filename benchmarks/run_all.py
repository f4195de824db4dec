"""Rerun every benchmark on this machine and write the report.

    python -m benchmarks run_all            # full run (CPU: about 20 minutes; CUDA: the paper's protocol)
    python -m benchmarks run_all --quick    # a few minutes: fewer runs, no paper-protocol table
    python -m benchmarks run_all --smoke --out /tmp/x   # seconds: tiny sizes, only checks that it all runs

Writes ``benchmarks/results/<machine>.json`` (``-quick`` / ``-smoke`` suffixed for those profiles), the
teaser plot ``<machine>.png`` next to it, and (full runs) regenerates the results section of
``benchmarks/README.md`` from every full results file in the folder.  The device is CUDA when a GPU is
visible, else CPU (``--device`` overrides).

Threads: ``--threads auto`` (default) keeps torch's choice unless the machine is already oversubscribed
(1-minute load average >= logical CPUs), in which case it uses 1 thread: OpenMP threads that have to
wait for time slices spin at every barrier, which slows element-wise operators several times over
(benchmarks/README.md, Protocol) and distorts the comparison towards models with fewer, larger operators.  The choice
is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import flops, model_table, report, scaling, training, window_attention
from .common import (
    RESULTS_DIR, format_size, load_average, log, machine_info, machine_slug, pick_device, script_parser, write_json_atomic,
)

README = Path(__file__).resolve().parent / "README.md"
PAPER_SIZE = (180, 320)  # LR input of the paper's protocol at x4: 1280x720 output


@dataclass
class Profile:
    """How much of each benchmark a run does."""

    table_sizes: list[tuple[int, int]]
    table_warmup: int
    table_runs: int
    table_models: list[str] | None  # None: the whole zoo
    paper_models: list[str] | None  # None: whole zoo; []: skip the paper-protocol table
    paper_warmup: int
    paper_runs: int
    attention_size: tuple[int, int]
    attention_window: int
    attention_dim: int
    attention_heads: int
    attention_backends: tuple[str, ...]
    attention_warmup: int
    attention_runs: int
    scaling_sides: list[int]
    scaling_tile: int
    scaling_preset: str
    scaling_runs: int
    train_batch: int
    train_runs: int
    train_preset: str
    flops_size: tuple[int, int]
    flops_runs: int
    in_process: bool = False  # smoke: measure in this process to stay fast (memory numbers then meaningless);
    # training always runs in a fresh process, so the smoke run still exercises the subprocess protocol
    extra: dict[str, Any] = field(default_factory=dict)


def make_profile(name: str, device: torch.device) -> Profile:
    cuda = device.type == "cuda"
    if name == "smoke":
        return Profile(
            table_sizes=[(32, 32)], table_warmup=1, table_runs=1, table_models=["ESC-light", "SAFMN"], paper_models=[],
            paper_warmup=1, paper_runs=1, attention_size=(32, 32), attention_window=16, attention_dim=16,
            attention_heads=2, attention_backends=("naive", "sdpa"), attention_warmup=1, attention_runs=1,
            scaling_sides=[16, 32], scaling_tile=16, scaling_preset="esc_tiny", scaling_runs=1, train_batch=1,
            train_runs=1, train_preset="esc_tiny", flops_size=(32, 32), flops_runs=1, in_process=True,
            extra={"train_patch": 32, "train_backends": ("sdpa",), "flops_preset": "esc_tiny", "matmul_n": 256},
        )
    if name == "quick":
        return Profile(
            table_sizes=[(64, 64)], table_warmup=1, table_runs=3, table_models=None, paper_models=[],
            paper_warmup=1, paper_runs=1, attention_size=(256, 256), attention_window=32, attention_dim=64,
            attention_heads=4, attention_backends=window_attention.BACKENDS, attention_warmup=1, attention_runs=3,
            scaling_sides=[32, 64, 96, 128], scaling_tile=64, scaling_preset="esc", scaling_runs=1,
            train_batch=16 if cuda else 1, train_runs=1, train_preset="esc", flops_size=(64, 64), flops_runs=2,
        )
    if cuda:  # the paper's protocol is cheap on a GPU: run it for the whole zoo
        return Profile(
            table_sizes=[PAPER_SIZE], table_warmup=10, table_runs=50, table_models=None, paper_models=[],
            paper_warmup=10, paper_runs=50, attention_size=(256, 256), attention_window=32, attention_dim=64,
            attention_heads=4, attention_backends=window_attention.BACKENDS, attention_warmup=10, attention_runs=50,
            scaling_sides=[128, 256, 512, 1024], scaling_tile=256, scaling_preset="esc", scaling_runs=10,
            train_batch=16, train_runs=10, train_preset="esc", flops_size=PAPER_SIZE, flops_runs=20,
        )
    return Profile(
        table_sizes=[(64, 64)], table_warmup=1, table_runs=10, table_models=None,
        paper_models=["ESC", "SwinIR-light"], paper_warmup=1, paper_runs=2,
        attention_size=(256, 256), attention_window=32, attention_dim=64, attention_heads=4,
        attention_backends=window_attention.BACKENDS, attention_warmup=1, attention_runs=10,
        scaling_sides=[64, 128, 160, 192], scaling_tile=128, scaling_preset="esc", scaling_runs=1,
        train_batch=2, train_runs=3, train_preset="esc", flops_size=(64, 64), flops_runs=5,
    )


def choose_threads(setting: str, device: torch.device) -> dict[str, Any]:
    """Apply ``--threads`` and say why (see the module docstring)."""
    default = torch.get_num_threads()
    if setting != "auto":
        torch.set_num_threads(int(setting))
        return {"used": int(setting), "torch_default": default, "reason": "set by --threads"}
    load = load_average()
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load[0] >= cpus and default > 1:
        torch.set_num_threads(1)
        return {"used": 1, "torch_default": default,
                "reason": f"auto: 1-minute load {load[0]} >= {cpus} CPUs (oversubscribed), so 1 thread"}
    return {"used": default, "torch_default": default, "reason": "auto: torch default"}


def _default_esc_models(names: list[str]) -> list[str]:
    """Zoo keys for names: a key ('ESC[naive]') as is; a model name: ours on the default backend, peers by name."""
    keys = []
    for entry in model_table.model_zoo():
        if entry.key in names or (entry.name in names and (entry.family == "peer" or entry.default_backend)):
            keys.append(entry.key)
    return keys


def _section(results: dict[str, Any], name: str, fn) -> None:
    """Run one benchmark; a crash is recorded in the results instead of ending the whole run."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # keep the other sections' numbers
        log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    if isinstance(results[name], dict):
        results[name]["section_wall_s"] = round(time.perf_counter() - start, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    profile_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = make_profile(profile_name, device)
    threads = choose_threads(args.threads, device)
    info = machine_info(device)
    slug = machine_slug(info)
    started = time.perf_counter()
    log(f"{profile_name} benchmark on {slug}; threads {threads['used']} ({threads['reason']})")
    results: dict[str, Any] = {"schema": 1, "profile": profile_name, "machine_slug": slug, "machine": info,
                               "threads": threads}
    only = set(args.only or [])
    wanted = (lambda name: not only or name in only)
    ip = profile.in_process

    if wanted("model_table"):
        _section(results, "model_table", lambda: {
            "sizes": [format_size(s) for s in profile.table_sizes], "warmup": profile.table_warmup,
            "rows": model_table.run(profile.table_sizes, device=device, warmup=profile.table_warmup,
                                    runs=profile.table_runs, include_heavy=args.all_models, in_process=ip,
                                    models=_default_esc_models(profile.table_models) if profile.table_models else None),
        })
    if wanted("paper_protocol") and profile.paper_models != []:
        names = profile.paper_models
        _section(results, "paper_protocol", lambda: {
            "sizes": [format_size(PAPER_SIZE)], "warmup": profile.paper_warmup,
            "rows": model_table.run([PAPER_SIZE], device=device, warmup=profile.paper_warmup, runs=profile.paper_runs,
                                    models=_default_esc_models(names) if names else None,
                                    include_heavy=args.all_models, in_process=ip),
        })
    if wanted("window_attention"):
        _section(results, "window_attention", lambda: window_attention.run(
            device=device, warmup=profile.attention_warmup, runs=profile.attention_runs, size=profile.attention_size,
            dim=profile.attention_dim, heads=profile.attention_heads, window=profile.attention_window,
            backends=profile.attention_backends, in_process=ip))
    if wanted("scaling"):
        _section(results, "scaling", lambda: scaling.run(
            profile.scaling_sides, device=device, warmup=1, runs=profile.scaling_runs, tile=profile.scaling_tile,
            preset=profile.scaling_preset, in_process=ip))
    if wanted("training"):  # always a fresh process: training must not inherit inference-mode state
        _section(results, "training", lambda: training.run(
            device=device, batch=profile.train_batch, warmup=1, runs=profile.train_runs, preset=profile.train_preset,
            lr_patch=profile.extra.get("train_patch", training.LR_PATCH), backends=profile.extra.get("train_backends")))
    if wanted("flops"):
        _section(results, "flops", lambda: flops.run(
            device=device, size=profile.flops_size, runs=profile.flops_runs, warmup=1,
            preset=profile.extra.get("flops_preset", "esc"), matmul_n=profile.extra.get("matmul_n", 2048),
            profile=profile_name != "smoke"))

    results["targets"] = report.evaluate_targets(results)
    results["load_average_at_end"] = load_average()
    # Judged from the load before this run started: afterwards the load includes the benchmark itself.
    start_load = (info.get("load_average_at_start") or [0])[0]
    results["shared_load"] = start_load >= 0.5 * (os.cpu_count() or 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer runs, smaller sizes, no paper-protocol table")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, one run each: checks that everything runs")
    parser.add_argument("--threads", default="auto", help="torch CPU threads: auto or a number")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results JSON and plot")
    parser.add_argument("--readme", type=Path, help="README to regenerate (default: benchmarks/README.md for full "
                        "runs written to the default folder; never for quick/smoke runs unless given)")
    parser.add_argument("--only", nargs="+", choices=["model_table", "paper_protocol", "window_attention", "scaling",
                                                       "training", "flops"], help="run only these sections")
    parser.add_argument("--all-models", action="store_true", help="include models too slow for the CPU budget (RCAN)")
    args = parser.parse_args(argv)

    results = run(args)
    suffix = "" if results["profile"] == "full" else f"-{results['profile']}"
    name = results["machine_slug"] + suffix
    json_path = args.out / f"{name}.json"
    plot_path = report.plot_teaser(results, args.out / f"{name}.png")
    results["plot"] = plot_path.name if plot_path else None
    write_json_atomic(json_path, results)
    log(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else ""))

    readme = args.readme
    if readme is None and results["profile"] == "full" and args.out.resolve() == RESULTS_DIR.resolve():
        readme = README
    if readme is not None:
        if results["profile"] == "full":
            sections = [report.render_markdown(data, data.get("plot")) for _, data in report.load_results(args.out)]
        else:
            sections = [report.render_markdown(results, results.get("plot"))]
        report.update_readme(readme, sections)
        log(f"updated {readme}")
    for target in results["targets"]:
        verdict = "n/a" if target["met"] is None else ("met" if target["met"] else "MISSED")
        print(f"{verdict:6s} {target['target']}: {target['value']} (threshold {target['threshold']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
