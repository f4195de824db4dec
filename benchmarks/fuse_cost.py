"""What ``esc_arch.fuse()`` saves: the cost of deriving the inference constants in every forward pass.

An unfused ESC model computes the geometric-ensembled large kernel and every block's attention bias from its
weights in each forward pass (there are no caches); ``fuse()`` bakes them once. This measures, per preset, the
time of that derivation alone and of a whole unfused and fused forward pass on the same input, interleaved.

    python -m benchmarks fuse_cost                  # esc_tiny / esc_light / esc at 128x128, CPU
    python -m benchmarks fuse_cost --size 180x320 --presets esc esc_xl --device cuda
"""

from __future__ import annotations

import copy
import statistics

import torch

import esc_arch
from esc_arch.attention import WindowAttention

from .common import (
    RESULTS_DIR, format_size, log, machine_info, parse_args, pick_device, script_parser, synchronize, time_once,
    write_payload,
)


def derive_constants(model: esc_arch.ESCModelBase) -> None:
    """Exactly what an unfused forward pass adds: the ensembled kernel and every attention bias."""
    for module in model.modules():
        if isinstance(module, esc_arch.ESCModelBase) and hasattr(module, "large_kernel"):
            module.large_kernel()
        if isinstance(module, WindowAttention):
            module.attention_bias(module.relative_position_bias.dtype)


def measure(preset: str, size: tuple[int, int], device: torch.device, runs: int) -> dict:
    unfused = esc_arch.PRESETS[preset](4).eval().to(device)
    fused = esc_arch.fuse(copy.deepcopy(unfused))
    x = torch.rand(1, 3, *size, device=device)
    times: dict[str, list[float]] = {"constants": [], "unfused": [], "fused": []}
    calls = {"constants": lambda: derive_constants(unfused), "unfused": lambda: unfused(x), "fused": lambda: fused(x)}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up
            fn()
        synchronize(device)
        for _ in range(runs):  # interleaved, so load changes hit all three alike
            for name, fn in calls.items():
                times[name].append(time_once(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "preset": preset,
        "size": format_size(size),
        "median_ms": median,
        "constants_share_of_forward": median["constants"] / median["unfused"],
        "unfused_over_fused": median["unfused"] / median["fused"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, size=(128, 128), runs=5, device="auto", out=RESULTS_DIR / "fuse_cost.json")
    parser.add_argument("--presets", nargs="+", default=["esc_tiny", "esc_light", "esc"])
    args = parse_args(parser, argv)
    device = pick_device(args.device)
    rows = []
    for preset in args.presets:
        row = measure(preset, args.size, device, args.runs)
        log(f"{preset} {row['size']}: constants {row['median_ms']['constants']:.2f} ms = "
            f"{100 * row['constants_share_of_forward']:.2f} % of an unfused forward "
            f"({row['median_ms']['unfused']:.0f} ms); unfused / fused = {row['unfused_over_fused']:.3f}")
        rows.append(row)
    write_payload(args.out, {"runs": args.runs, "results": rows}, machine_info(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
