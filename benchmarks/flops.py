"""The limit: how close ESC's forward pass comes to the machine's matrix-multiply throughput.

* FLOPs of the ESC ×4 forward are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
  multiply-accumulate; convolutions and matrix products).  torch has no FLOP formula for the CPU flash
  attention kernel, so the count is taken on the ``naive`` backend, whose two batched matmuls per window
  are the same arithmetic; softmax and element-wise work are not counted (as in the paper's fvcore counts,
  which however count multiply-accumulates, i.e. half of ours).
* The achieved rate is FLOPs / median latency of the default path, measured in this process.
* The machine's reference is the median GFLOP/s of an fp32 N x N matrix product, measured in the same run
  (before and after the model, so load drift on a shared machine shows up as a spread).
* A profile of one forward pass groups the time by operator, to show where the gap to the matmul rate goes.

    python -m benchmarks flops --size 64x64
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import format_size, log, parse_args, pick_device, print_json, script_parser, time_callable
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


def run(*, device: torch.device, size: tuple[int, int], runs: int, warmup: int, preset: str = "esc",
        matmul_n: int = 2048, profile: bool = True) -> dict[str, Any]:
    import esc_arch

    log(f"flops: {preset} x{SCALE} at {format_size(size)}, matmul {matmul_n}^3 on {device.type}")
    flops = count_forward_flops(preset, size, device)
    before = matmul_gflops(device, n=matmul_n)
    model = esc_arch.fuse(esc_arch.PRESETS[preset](SCALE).eval().to(device))
    x = torch.rand(1, 3, *size, device=device)
    with torch.inference_mode():
        timing = time_callable(lambda: model(x), device, warmup=warmup, runs=runs)
    after = matmul_gflops(device, n=matmul_n)
    matmul = statistics.median(before + after)
    achieved = flops["total"] / (timing.median_ms / 1e3) / 1e9
    result: dict[str, Any] = {
        "preset": preset,
        "backend": model.attn_type,
        "size": format_size(size),
        "forward_gflop": round(flops["total"] / 1e9, 3),
        "forward_gflop_by_op": {k: round(v / 1e9, 3) for k, v in flops["by_op"].items()},
        "forward": timing.as_dict(),
        "achieved_gflops": round(achieved, 2),
        "matmul_n": matmul_n,
        "matmul_gflops": round(matmul, 2),
        "matmul_gflops_before": [round(v, 2) for v in before],
        "matmul_gflops_after": [round(v, 2) for v in after],
        "fraction_of_matmul": round(achieved / matmul, 3),
    }
    if profile and device.type == "cpu":
        result["profile"] = profile_forward(model, x)
    log(f"  {result['forward_gflop']:.1f} GFLOP in {timing.median_ms:.0f} ms = {achieved:.1f} GFLOP/s; "
        f"matmul {matmul:.1f} GFLOP/s ({100 * achieved / matmul:.0f}%)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto", size=(64, 64), warmup=1, runs=5, threads=None)
    parser.add_argument("--preset", default="esc")
    args = parse_args(parser, argv)
    return print_json(run(device=pick_device(args.device), size=args.size, runs=args.runs, warmup=args.warmup,
                          preset=args.preset))


if __name__ == "__main__":
    raise SystemExit(main())
