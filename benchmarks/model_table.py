"""Latency and peak memory of every model in the zoo at one or more input sizes, one fresh process per case.

Each row also carries its ratios to ESC ×4 on the default attention backend at the same input size
(latency ratio > 1: the row is slower than ESC; memory ratio > 1: it needs more memory).

    python -m benchmarks model_table --sizes 64x64 --runs 10
"""

from __future__ import annotations

from typing import Any

import torch

from .common import (
    Timing, format_size, log, parse_args, parse_size, pick_device, print_json, script_parser, time_callable, time_once,
)
from .models import count_parameters, find_entry, model_zoo, padded_size, prepare
from .peak_memory import run_case


def workload(case: dict[str, Any], device: torch.device):
    """Child side: build the model and a uniform [0, 1) input; return the forward pass to time."""
    entry = find_entry(case["model"])
    model = prepare(entry, device)
    size = padded_size(entry, tuple(case["size"]))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *size, generator=generator).to(device)
    with torch.inference_mode():
        out_shape = list(model(x).shape) if case.get("check_output", True) else None
    info = {
        "model": entry.name,
        "backend": entry.backend,
        "key": entry.key,
        "params": count_parameters(model),
        "input_size": list(size),
        "output_shape": out_shape,
    }
    return (lambda: model(x)), info


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference in (None, 0):
        return None
    return round(value / reference, 3)


def add_ratios(rows: list[dict[str, Any]], reference_key: str) -> None:
    """Ratios of each row's latency and memory to the reference row at the same input size."""
    by_size: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("key") == reference_key and "error" not in row:
            by_size[row["size"]] = row
    for row in rows:
        ref = by_size.get(row["size"])
        row["reference"] = reference_key
        row["latency_vs_esc"] = ratio(row.get("median_ms"), ref and ref.get("median_ms"))
        row["memory_vs_esc"] = ratio(row.get("peak_mb"), ref and ref.get("peak_mb"))


def select_models(names: list[str] | None, include_heavy: bool, device: torch.device) -> list[str]:
    """Zoo keys to run: all (minus heavy ones on CPU unless asked), or those whose key/name is listed."""
    keys = []
    for entry in model_zoo():
        if names:
            if entry.key in names or entry.name in names:
                keys.append(entry.key)
        elif include_heavy or device.type == "cuda" or not entry.heavy:
            keys.append(entry.key)
    return keys


def measure_latency_round_robin(
    keys: list[str], size: tuple[int, int], *, device: torch.device, warmup: int, runs: int
) -> dict[str, dict[str, Any]]:
    """Latency of several models in one process, interleaved: each round runs every model once.

    On a machine shared with other jobs the load drifts over minutes; interleaving spreads that drift
    over all models alike, so the ratios between rows stay meaningful even when absolute times are not.
    The order within a round rotates so no model always runs right after the same neighbour.
    """
    models: dict[str, Any] = {}
    inputs: dict[str, torch.Tensor] = {}
    results: dict[str, dict[str, Any]] = {}
    generator = torch.Generator().manual_seed(0)
    for key in keys:
        entry = find_entry(key)
        try:
            # Built outside inference_mode: parameters created there become inference tensors.
            models[key] = prepare(entry, device)
            inputs[key] = torch.rand(1, 3, *padded_size(entry, size), generator=generator).to(device)
            with torch.inference_mode():
                first = time_callable(lambda: models[key](inputs[key]), device, warmup=warmup, runs=1)
            results[key] = {"first_call_ms": round(first.first_call_ms, 3), "warmup": first.warmup,
                            "input_size": list(inputs[key].shape[-2:]),
                            "params": count_parameters(models[key])}
            log(f"  latency warm-up {key}: first call {first.first_call_ms:.0f} ms")
        except Exception as exc:  # one broken model must not stop the table
            results[key] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            models.pop(key, None)
            log(f"  {key}: FAILED: {results[key]['error']}")
    times: dict[str, list[float]] = {key: [] for key in models}
    live = list(models)
    with torch.inference_mode():
        for round_index in range(runs):
            shift = round_index % max(len(live), 1)
            for key in live[shift:] + live[:shift]:
                times[key].append(time_once(lambda: models[key](inputs[key]), device))
    for key, samples in times.items():
        summary = Timing(times_ms=samples, warmup=results[key]["warmup"],
                         first_call_ms=results[key]["first_call_ms"]).as_dict()
        results[key].update(summary)
    return results


def run(
    sizes: list[tuple[int, int]],
    *,
    device: torch.device,
    warmup: int,
    runs: int,
    models: list[str] | None = None,
    include_heavy: bool = False,
    measure_memory: bool = True,
    in_process: bool = False,
) -> list[dict[str, Any]]:
    """Measure every selected model at every size; returns one row per (model, size).

    Latency: median of ``runs`` interleaved runs in this process after ``warmup`` runs.
    Memory: one fresh process per case (``peak_memory.run_case``), one warm-up and one measured run.
    """
    keys = select_models(models, include_heavy, device)
    rows = []
    for size in sizes:
        log(f"model table at {format_size(size)} on {device.type}: {len(keys)} models, {runs} interleaved runs")
        latencies = measure_latency_round_robin(keys, size, device=device, warmup=warmup, runs=runs)
        for key in keys:
            entry = find_entry(key)
            row: dict[str, Any] = {"key": key, "model": entry.name, "family": entry.family, "backend": entry.backend,
                                   "default_backend": entry.default_backend, "size": format_size(size),
                                   "source": entry.source}
            row.update(latencies[key])
            if measure_memory and "error" not in row:
                case = {"workload": "benchmarks.model_table:workload", "model": key, "size": list(size),
                        "device": str(device), "warmup": 1, "runs": 1, "threads": torch.get_num_threads()}
                memory = run_case(case, in_process=in_process, fixed_allocator=True)
                if "error" in memory:
                    row["memory_error"] = memory["error"]
                else:
                    row.update({k: memory[k] for k in ("peak_mb", "peak_rss_mb", "rss_after_import_mb",
                                                        "memory_kind", "output_shape") if k in memory})
                    if device.type == "cpu":
                        row["memory_kind"] = row.get("memory_kind", "") + "; glibc mmap threshold fixed"
            if entry.paper:
                row["paper"] = vars(entry.paper)
            if "error" not in row:
                log(f"  {key}: {row['median_ms']:.1f} ms, {row.get('peak_mb', float('nan')):.0f} MB")
            rows.append(row)
    reference = next((e.key for e in model_zoo() if e.name == "ESC" and e.default_backend), "ESC")
    add_ratios(rows, reference)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto", warmup=2, runs=10, threads=None)
    parser.add_argument("--sizes", nargs="+", default=["64x64"], help="LR input sizes HxW (default 64x64)")
    parser.add_argument("--models", nargs="*", help="zoo keys or names (default: all)")
    parser.add_argument("--all-models", action="store_true", help="include models too slow for the CPU budget")
    args = parse_args(parser, argv)
    return print_json(run([parse_size(s) for s in args.sizes], device=pick_device(args.device), warmup=args.warmup,
                          runs=args.runs, models=args.models, include_heavy=args.all_models))


if __name__ == "__main__":
    raise SystemExit(main())
