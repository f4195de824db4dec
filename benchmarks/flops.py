"""The limit: how close ESC's forward pass comes to the machine.

* FLOPs of the ESC ×4 forward are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
  multiply-accumulate; convolutions and matrix products).  torch has no FLOP formula for the CPU flash
  attention kernel, so the count is taken on the ``naive`` backend, whose two batched matmuls per window
  are the same arithmetic; softmax and element-wise work are not counted (as in the paper's fvcore counts,
  which however count multiply-accumulates, i.e. half of ours). The native partial convolution does fewer
  operations than it is credited with (28 orbits of the 13×13 kernel instead of 169 taps): the count is the model's,
  the same for every path.
* The achieved rate is FLOPs / median latency, for each path a prepared model (``esc_runtime.prepare``) runs on this
  CPU: torch's operators (native kernels off) and each native variant the CPU runs (``avx512``, ``avx2``; forced,
  so every kernel runs), all measured alternately in this process.
* The machine's references, measured in the same run: each variant's fused multiply-add peak (``native.fma_peak``:
  independent register FMAs on every thread; ``fraction_of_fma_peak``), and the median GFLOP/s of an fp32 N x N matrix
  product (before and after the model, so load drift on a shared machine shows up as a spread).
* A profile of one forward pass of the default path groups the time by operator.

    python -m benchmarks flops --size 180x320 --threads 2
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import format_size, log, parse_args, pick_device, print_json, script_parser, synchronize, time_callable
from .models import SCALE


def count_forward_flops(preset: str, size: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """FLOPs of one forward pass at ``size`` (counted on the naive attention backend, see module doc)."""
    import esc_arch

    model = esc_arch.PRESETS[preset](SCALE, attn_type="naive").eval().to(device)
    x = torch.rand(1, 3, *size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    by_op = {str(op).replace("aten.", ""): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def matmul_gflops(device: torch.device, *, n: int = 2048, runs: int = 5) -> list[float]:
    """GFLOP/s of ``runs`` fp32 n x n @ n x n products (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    timing = time_callable(lambda: a @ b, device, warmup=2, runs=runs)
    return [2 * n**3 / (t / 1e3) / 1e9 for t in timing.times_ms]


OP_GROUPS = (
    ("attention", ("attention", "bmm", "softmax", "baddbmm")),
    ("convolution", ("conv",)),
    ("copies / layout", ("copy_", "clone", "contiguous", "cat", "pad", "reflection", "permute")),
    ("element-wise", ("add", "mul", "gelu", "sub", "div", "layer_norm", "sum", "mean", "upsample", "pixel_shuffle")),
)


def profile_forward(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Self time of one forward pass, grouped (attention / convolution / copies / element-wise / other)
    and the top operators."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        name = event.key.removeprefix("aten::")
        group = next((g for g, keys in OP_GROUPS if any(k in name for k in keys)), "other")
        groups[group] += event.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "total_ms": round(total / 1e3, 2),
        "share_by_group": {g: round(v / total, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
                     "share": round(e.self_cpu_time_total / total, 3)} for e in top],
    }


def _paths(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """The prepared forwards to compare, by name: torch's operators, then each native variant this CPU runs."""
    import esc_runtime
    from esc_runtime import native

    def plan(prepared) -> dict[str, str]:
        return {kind: choice.implementation.name for kind, choice in prepared.plan.choices.items()}

    paths: dict[str, Any] = {"torch (native off)": esc_runtime.prepare(model, device, disable=("native",))}
    if device.type == "cpu":
        for variant in native.cpu_variants():
            if native.select(variant).startswith(f"{variant} variant"):
                paths[f"native {variant}"] = (variant, esc_runtime.prepare(model, device))
        native.select(None)
        default = esc_runtime.prepare(model, device)
        same = [name for name, path in paths.items()
                if plan(path[1] if isinstance(path, tuple) else path) == plan(default)
                and (not isinstance(path, tuple) or path[0] == native.variant())]
        if not same:  # the default runs some of the variant's kernels only (esc_runtime.layers.NATIVE_BY_DEFAULT)
            paths[f"default ({native.variant()}, by measurement)"] = default
    return paths


def run(*, device: torch.device, size: tuple[int, int], runs: int, warmup: int, preset: str = "esc",
        matmul_n: int = 2048, profile: bool = True) -> dict[str, Any]:
    import esc_arch
    import esc_runtime
    from esc_runtime import native

    log(f"flops: {preset} x{SCALE} at {format_size(size)}, matmul {matmul_n}^3 on {device.type}, "
        f"{torch.get_num_threads()} threads")
    flops = count_forward_flops(preset, size, device)
    before = matmul_gflops(device, n=matmul_n)
    model = esc_arch.PRESETS[preset](SCALE).eval().to(device)
    x = torch.rand(1, 3, *size, device=device)
    paths = _paths(model, device)

    def call(name: str):
        path = paths[name]
        if isinstance(path, tuple):  # a native variant: loaded for its calls (a prepared layer keeps its choice)
            native.select(path[0])
            return lambda: path[1](x)
        native.select(None)
        return lambda: path(x)

    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for name in paths:  # warm-up, each path once (or `warmup` times)
            fn = call(name)
            for _ in range(max(warmup, 1)):
                fn()
        for i in range(runs):  # alternating, the order reversed every other round
            for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
                fn = call(name)
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append((time.perf_counter() - start) * 1e3)
    peaks = {}
    for name, path in paths.items():
        if isinstance(path, tuple):
            native.select(path[0])
            peaks[name] = native.fma_peak()
    native.select(None)
    after = matmul_gflops(device, n=matmul_n)
    matmul = statistics.median(before + after)
    per_path = {}
    for name, ms in times.items():
        median = statistics.median(ms)
        achieved = flops["total"] / (median / 1e3) / 1e9
        per_path[name] = {"median_ms": round(median, 1), "min_ms": round(min(ms), 1),
                          "achieved_gflops": round(achieved, 2), "fraction_of_matmul": round(achieved / matmul, 3)}
        peak = peaks.get(name) or (max(peaks.values()) if peaks else None)
        if peak:  # torch's path: against the best variant's peak (the machine's)
            per_path[name] |= {"fma_peak_gflops": round(peak, 1), "fraction_of_fma_peak": round(achieved / peak, 3)}
        log(f"  {name}: {median:.0f} ms = {achieved:.1f} GFLOP/s"
            + (f", {100 * achieved / peak:.0f}% of the {peak:.0f} GFLOP/s FMA peak" if peak else ""))
    default = esc_runtime.prepare(model, device)  # what esc-sr runs here by default
    default_name = next((n for n in paths if n.startswith("default")), None) or next(
        (n for n, p in paths.items() if isinstance(p, tuple) and p[0] == native.variant()), "torch (native off)")
    achieved = per_path[default_name]["achieved_gflops"]
    result: dict[str, Any] = {
        "preset": preset,
        "backend": model.attn_type,
        "size": format_size(size),
        "threads": torch.get_num_threads(),
        "forward_gflop": round(flops["total"] / 1e9, 3),
        "forward_gflop_by_op": {k: round(v / 1e9, 3) for k, v in flops["by_op"].items()},
        "default_path": default_name,
        "default_report": default.report(),
        "forward": {"median_ms": per_path[default_name]["median_ms"], "times_ms": times[default_name]},
        "paths": per_path,
        "achieved_gflops": achieved,
        "matmul_n": matmul_n,
        "matmul_gflops": round(matmul, 2),
        "matmul_gflops_before": [round(v, 2) for v in before],
        "matmul_gflops_after": [round(v, 2) for v in after],
        "fraction_of_matmul": round(achieved / matmul, 3),
    }
    if "fraction_of_fma_peak" in per_path[default_name]:
        result["fraction_of_fma_peak"] = per_path[default_name]["fraction_of_fma_peak"]
    if profile and device.type == "cpu":
        result["profile"] = profile_forward(default, x)
    log(f"  default ({default_name}): {achieved:.1f} GFLOP/s; matmul {matmul:.1f} GFLOP/s "
        f"({100 * achieved / matmul:.0f}%)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto", size=(64, 64), warmup=1, runs=5, threads=None)
    parser.add_argument("--preset", default="esc")
    args = parse_args(parser, argv)
    return print_json(run(device=pick_device(args.device), size=args.size, runs=args.runs, warmup=args.warmup,
                          preset=args.preset))


if __name__ == "__main__":
    raise SystemExit(main())
