"""Latency and peak memory of ``esc_sr.upscale`` at the paper's protocol, per preset and attention backend.

    python -m benchmarks bench_upscale                      # esc, esc_light, esc_fp x sdpa, flex, naive
    python -m benchmarks bench_upscale --presets esc --backends sdpa --runs 3

Protocol (the paper's ``test_direct_metrics``): x4, a 320x180 input (-> 1280x720), batch 1, fp32, uniform
[0, 1] input, random weights (latency does not depend on them), untiled (``tile=None``: the engine pads
to the window, 320x192, runs once and crops), warm-up runs, then the median of the timed runs. Each case
runs in a fresh process (``benchmarks.peak_memory``), which reports the peak RSS over the timed runs
minus the RSS after imports (weights + activations + allocator slack) and the absolute peak RSS.
The table goes to stdout (markdown) and everything to ``benchmarks/results/bench_upscale.json``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .common import RESULTS_DIR, log, machine_info, parse_args, pick_device, script_parser, write_payload
from .peak_memory import run_case

PRESETS = ("esc", "esc_light", "esc_fp")
BACKENDS = ("sdpa", "naive", "flex")


def workload(case: dict[str, Any], device: torch.device):
    """Child side: the model and input of one case; returns the timed call and facts about it."""
    import esc_arch
    from esc_sr import engine

    torch.manual_seed(0)
    model = esc_arch.PRESETS[case["preset"]](case["scale"], attn_type=case["backend"]).eval().to(device)
    esc_arch.fuse(model)
    width, height = case["size"]
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)

    def call() -> torch.Tensor:
        return engine.upscale(model, x, tile=None, precision="fp32", device=device)

    out_shape = list(call().shape)
    info = {
        "preset": case["preset"],
        "backend": case["backend"],
        "params": esc_arch.count_parameters(model),
        "input": f"{width}x{height}",
        "output_shape": out_shape,
    }
    return call, info


def run(
    presets, backends, *, device: str, runs: int, warmup: int, size=(320, 180), scale=4,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every (backend, preset) case, backend by backend; ``on_row`` gets the rows so far."""
    import esc_arch
    import esc_runtime

    rows = []
    for backend in backends:
        for preset in presets:
            log(f"{preset} / {backend}")
            case = {"workload": "benchmarks.bench_upscale:workload", "preset": preset, "backend": backend,
                    "size": list(size), "scale": scale, "device": device, "runs": runs, "warmup": warmup}
            result = run_case(case)
            # Which kernel the backend really runs, asked here (the profiler would inflate the child's RSS).
            model = esc_arch.PRESETS[preset](scale, attn_type=backend)
            result.setdefault("preset", preset)
            result.setdefault("backend", backend)
            result["kernel"] = esc_runtime.attention_kernel(model, pick_device(device), torch.float32)
            rows.append(result)
            if on_row is not None:
                on_row(rows)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | backend | kernel | params | median latency | first call | peak memory (RSS delta) | peak RSS |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['preset']} | {row['backend']} | {row.get('kernel', '')} | | failed: {row['error'][:80]} | | | |")
            continue
        lines.append(
            f"| {row['preset']} | {row['backend']} | {row['kernel']} | {row['params']:,} | {row['median_ms'] / 1e3:.2f} s "
            f"| {row['first_call_ms'] / 1e3:.1f} s | {row['peak_mb']:.0f} MiB | {row['peak_rss_mb']:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="cpu", runs=5, warmup=2, out=RESULTS_DIR / "bench_upscale.json")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS) + ["esc_xl", "esc_tiny"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parse_args(parser, argv)

    machine = machine_info(pick_device(args.device))

    def save(rows: list[dict[str, Any]]) -> None:  # after every case, so a long run keeps what it measured
        write_payload(args.out, {"protocol": "x4, 320x180 -> 1280x720, batch 1, fp32, tile=None",
                                 "runs": args.runs, "warmup": args.warmup, "rows": rows}, machine)

    rows = run(args.presets, args.backends, device=args.device, runs=args.runs, warmup=args.warmup, on_row=save)
    save(rows)
    cpu = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs)"
    print(f"esc_sr.upscale, x4, 320x180 -> 1280x720, batch 1, fp32, {args.runs} runs after {args.warmup} warm-up, "
          f"on {cpu}, torch {machine['torch']}, load average at start {machine.get('load_average_at_start')}\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
