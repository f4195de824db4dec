"""How ESC's cost grows with the image: latency and peak memory against input pixels, with and without
tiling through ``esc_sr.upscale`` (the engine every front end uses).

Expected shape: latency linear in pixels (all of ESC's operators are local: convolutions and fixed-size
windows), memory linear without tiling and bounded by the tile with it.  Each case runs in a fresh
process; the least-squares fit ``latency = a + b * pixels`` and its R^2 are reported per mode.

    python -m benchmarks scaling --sizes 64 128 192 256 --tile 128
"""

from __future__ import annotations

from typing import Any

import torch

from .common import log, parse_args, pick_device, print_json, script_parser
from .models import SCALE
from .peak_memory import measure_case


def workload(case: dict[str, Any], device: torch.device):
    """Child side: ``esc_sr.upscale`` of a random square image, tiled or not, fp32."""
    import esc_arch
    import esc_sr

    model = esc_arch.PRESETS[case.get("preset", "esc")](SCALE).eval()
    with torch.no_grad():  # trained models have non-zero dynamic-kernel predictors (zero-initialised upstream);
        for module in model.modules():  # with them the engine runs its global-pool statistics pass when tiling
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.02)
    model = esc_arch.fuse(model.to(device))
    side = int(case["side"])
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    tile = case.get("tile")

    def forward():
        return esc_sr.upscale(model, x, tile=tile, precision="fp32", device=device)

    info = {"preset": case.get("preset", "esc"), "side": side, "pixels": side * side, "tile": tile,
            "backend": model.attn_type}
    return forward, info


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least-squares y = a + b x with R^2 (None with fewer than 2 distinct points)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": a, "slope_per_pixel": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def run(
    sides: list[int], *, device: torch.device, warmup: int, runs: int, tile: int, preset: str = "esc",
    in_process: bool = False,
) -> dict[str, Any]:
    rows = []
    for mode_tile in (None, tile):
        for side in sides:
            mode = "untiled" if mode_tile is None else f"tile {mode_tile}"
            log(f"scaling: {preset} x{SCALE} {side}x{side} {mode}")
            case = {"workload": "benchmarks.scaling:workload", "preset": preset, "side": side, "tile": mode_tile,
                    "device": str(device), "warmup": warmup, "runs": runs, "threads": torch.get_num_threads()}
            result = measure_case(case, in_process=in_process, split=False)
            result.update(side=side, pixels=side * side, tile=mode_tile, mode=mode)
            if "error" in result:
                log(f"  FAILED: {result['error']}")
            else:
                log(f"  {result['median_ms']:.0f} ms, {result['peak_mb']:.0f} MB")
            rows.append(result)
    fits = {}
    for mode in {r["mode"] for r in rows}:
        ok = [r for r in rows if r["mode"] == mode and "error" not in r]
        fits[mode] = {
            "latency_ms": linear_fit([r["pixels"] for r in ok], [r["median_ms"] for r in ok]),
            "memory_mb": linear_fit([r["pixels"] for r in ok], [r["peak_mb"] for r in ok]),
        }
    return {"preset": preset, "scale": SCALE, "tile": tile, "rows": rows, "fits": fits}


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto", warmup=1, runs=3, threads=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192, 256], help="LR sides")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--preset", default="esc")
    args = parse_args(parser, argv)
    return print_json(run(args.sizes, device=pick_device(args.device), warmup=args.warmup, runs=args.runs,
                          tile=args.tile, preset=args.preset))


if __name__ == "__main__":
    raise SystemExit(main())
