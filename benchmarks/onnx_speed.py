"""The ONNX route's speed: onnxruntime on CPU against PyTorch on CPU, same model, same input.

    python -m benchmarks onnx_speed                          # ESC x4, 180x320 input (-> 720x1280), 1 thread
    python -m benchmarks onnx_speed --preset esc_light --size 64x64 --runs 5 --threads 2

The model (``esc_arch.PRESETS[preset](scale)``, seeded random weights; latency does not depend on them) is
exported with ``esc_sr.onnx_export.export_onnx`` (fp32, the graph ``esc-sr export-onnx`` writes, checked
against PyTorch at its small check sizes).  Both sides then compute the same thing on the same input: the
model, then the clamp to [0, 1] (PyTorch: the ``fuse()``-d model under ``inference_mode``, as
``esc_sr.upscale`` runs it untiled; onnxruntime: the CPU execution provider with all graph optimisations).
Timing is interleaved -- one warm-up call each, then every round runs both once, in alternating order --
so load changes on a shared machine hit both alike; the medians and their ratio (also per round, and of
the minima) go to stdout and to
``benchmarks/results/onnx_speed.json`` together with the machine, the thread counts and the load average
at start and end.  The outputs of the last round are compared (max |difference|).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS_DIR, format_size, load_average, log, machine_info, parse_args, script_parser, time_once, write_payload


def measure(preset: str, scale: int, size: tuple[int, int], *, threads: int, warmup: int, runs: int) -> dict:
    import onnxruntime as ort

    import esc_arch
    from esc_sr.onnx_export import export_onnx

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = esc_arch.PRESETS[preset](scale).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        started = time.perf_counter()
        report = export_onnx(model, path, check_sizes=((1, 37, 53), (2, 29, 31)))
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_mb = path.stat().st_size / 1e6
    esc_arch.fuse(model)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    feed = {"input": x.numpy()}
    outputs: dict[str, np.ndarray] = {}

    def run_torch() -> None:
        with torch.inference_mode():
            outputs["pytorch"] = model(x).clamp(0, 1).numpy()

    def run_ort() -> None:
        outputs["onnxruntime"] = session.run(["output"], feed)[0]

    calls = {"pytorch": run_torch, "onnxruntime": run_ort}
    cpu = torch.device("cpu")
    first_ms = {name: time_once(fn, cpu) for name, fn in calls.items()}
    for _ in range(max(warmup, 1) - 1):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(runs):
        order = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        for name in order:
            times[name].append(time_once(calls[name], cpu))
            log(f"round {round_index + 1}/{runs}: {name} {times[name][-1] / 1e3:.1f} s")
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "preset": preset,
        "scale": scale,
        "input": format_size(size),
        "output_shape": list(outputs["onnxruntime"].shape),
        "params": esc_arch.count_parameters(model),
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1},
        "onnxruntime": ort.__version__,
        "graph_mb": round(graph_mb, 2),
        "export_s": round(export_s, 1),
        "export_check_max_abs_diff": max(report.max_abs_diff.values()),
        "warmup": max(warmup, 1),
        "runs": runs,
        "first_call_ms": {name: round(v, 1) for name, v in first_ms.items()},
        "times_ms": {name: [round(t, 1) for t in values] for name, values in times.items()},
        "median_ms": {name: round(v, 1) for name, v in median.items()},
        "min_ms": {name: round(min(values), 1) for name, values in times.items()},
        "onnxruntime_over_pytorch": round(median["onnxruntime"] / median["pytorch"], 3),
        # Per round (the two runs of a round are seconds apart, so they saw nearly the same load).
        "onnxruntime_over_pytorch_paired_median": round(
            statistics.median(o / p for o, p in zip(times["onnxruntime"], times["pytorch"])), 3
        ),
        "onnxruntime_over_pytorch_of_minima": round(min(times["onnxruntime"]) / min(times["pytorch"]), 3),
        "max_abs_diff_at_size": float(np.abs(outputs["onnxruntime"] - outputs["pytorch"]).max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, size=(180, 320), warmup=1, runs=3, out=RESULTS_DIR / "onnx_speed.json")
    parser.add_argument("--preset", default="esc")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="threads of both runtimes (default 1)")
    parser.add_argument("--note", default="", help="free text stored with the results, e.g. what else ran")
    args = parse_args(parser, argv)

    machine = machine_info(torch.device("cpu"))
    started = time.perf_counter()
    result = measure(args.preset, args.scale, args.size, threads=args.threads, warmup=args.warmup, runs=args.runs)
    payload = write_payload(args.out, {
        "benchmark": "onnx_speed",
        "load_average_at_end": load_average(),
        "note": args.note,
        "wall_s": round(time.perf_counter() - started, 1),
        "result": result,
    }, machine)
    m = result["median_ms"]
    print(
        f"{args.preset} x{args.scale} at {result['input']}, {args.threads} thread(s): PyTorch {m['pytorch'] / 1e3:.2f} s, "
        f"onnxruntime {m['onnxruntime'] / 1e3:.2f} s (median of {args.runs}); onnxruntime / PyTorch = "
        f"{result['onnxruntime_over_pytorch']:.2f} (per round: {result['onnxruntime_over_pytorch_paired_median']:.2f}, "
        f"minima: {result['onnxruntime_over_pytorch_of_minima']:.2f}); max |diff| {result['max_abs_diff_at_size']:.2e}; "
        f"load average {machine['load_average_at_start']} -> {payload['load_average_at_end']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
