"""Exact tiling against the untiled run: time and peak memory of one large image, each mode in a fresh process.

Modes, all through ``esc_sr.upscale`` on the same model and image:

* ``untiled``: ``tile=None``, the whole image at once (the reference compute);
* ``streamed``: ``tile=N``, layer-streamed (every stage over all tiles before the next; :mod:`esc_runtime.streaming`);
* ``overlap``: ``tile=N`` forced onto the crop-overlap fallback (64 px of context per side and a statistics pass
  for the global pools), what tiling cost before streaming.

Issue target: streamed <= 1.35x untiled on a 2048x2048 x2 input with 512 px tiles, peak memory bounded by the
tile plus the whole feature maps. The model is ESC (base preset) at the scale asked; with ``--weights`` (default:
the golden fixtures' ESC x4, resized to the scale as upstream does) its dynamic kernels are active, so the
overlap mode pays its statistics pass. Each run is one call (these are minutes long); peak memory is the peak RSS
during the call minus the RSS just before it.

    python -m benchmarks streamed_tiling                         # 2048x2048 x2, tile 512, all modes
    python -m benchmarks streamed_tiling --size 512 --tile 128 --modes untiled streamed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from unittest import mock

import torch

from .common import (
    GOLDEN_DIR, MIB, RESULTS_DIR, current_rss_bytes, emit, load_average, log, parse_args, peak_rss_bytes, reset_peak_rss,
    run_child, script_parser, write_results,
)

MODES = ("untiled", "streamed", "overlap")
GOLDEN_ESC_X4 = GOLDEN_DIR / "esc_x4.ckpt.pth"
MARKER = "STREAMED-TILING-RESULT "


def _model(scale: int, weights: str | None) -> torch.nn.Module:
    import esc_arch

    model = esc_arch.load_model(weights, upscaling_factor=scale) if weights else esc_arch.esc(scale)
    return esc_arch.fuse(model)


def child(case: dict) -> dict:
    """One mode in this (fresh) process: build, then time one call and its peak RSS."""
    import esc_sr
    from esc_sr import engine, memory

    torch.set_num_threads(int(case["threads"]))
    model = _model(case["scale"], case.get("weights"))
    image = torch.rand(1, 3, case["size"], case["size"], generator=torch.Generator().manual_seed(0))
    tile = None if case["mode"] == "untiled" else case["tile"]
    patch = mock.patch.object(engine, "_stream_tile", lambda *a: None) if case["mode"] == "overlap" else contextlib.nullcontext()
    reset_peak_rss()
    before = current_rss_bytes() or 0
    with patch:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = esc_sr.upscale(model, image, tile=tile)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    del out
    dtype, side = torch.float32, case["size"]
    return {
        **case,
        "seconds": round(seconds, 2),
        # CPU time of this process: on a shared machine the fairer comparison (wall time follows the other jobs)
        "cpu_seconds": round(cpu_seconds, 2),
        "peak_mb": round((peak_rss_bytes() - before) / MIB, 1),
        "estimate_untiled_mb": round(side * side * memory.bytes_per_input_pixel(model, dtype) / MIB, 1),
        "estimate_stream_maps_mb": round(memory.streamed_map_bytes(model, dtype, side, side) / MIB, 1),
        "estimate_tile_mb": round((case["tile"] + 16) ** 2 * memory.bytes_per_input_pixel(model, dtype) / MIB, 1),
    }


def run_mode(case: dict, timeout_s: float) -> dict:
    result = run_child("benchmarks.streamed_tiling", ["--child", json.dumps(case)], MARKER, timeout_s=timeout_s)
    return {**case, "error": result["error"]} if "error" in result else result


def markdown(rows: list[dict], machine: dict) -> str:
    base = next((r for r in rows if r["mode"] == "untiled" and "error" not in r), None)
    lines = [
        f"Machine: {machine.get('cpu', '?')}, {rows[0]['threads']} thread(s). Load average before/after: "
        f"{rows[0].get('load')}", "",
        "| mode | time (s) | vs untiled | CPU time (s) | vs untiled | peak memory (MB) | estimate (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mode']} | error: {row['error']} | | | | | |")
            continue
        ratio = f"{row['seconds'] / base['seconds']:.3f}x" if base else "-"
        cpu = row.get("cpu_seconds")
        cpu_ratio = f"{cpu / base['cpu_seconds']:.3f}x" if base and cpu and base.get("cpu_seconds") else "-"
        estimate = row["estimate_untiled_mb"] if row["mode"] == "untiled" else row["estimate_stream_maps_mb"] + row["estimate_tile_mb"]
        if row["mode"] == "overlap":
            estimate = row["estimate_tile_mb"]
        cpu_text = f"{cpu:.1f}" if cpu else "-"
        lines.append(f"| {row['mode']} | {row['seconds']:.1f} | {ratio} | {cpu_text} | {cpu_ratio} | {row['peak_mb']:.0f} | "
                     f"{estimate:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, out=RESULTS_DIR / "streamed_tiling.json")
    parser.add_argument("--size", type=int, default=2048, help="side of the square LR input")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--weights", default=str(GOLDEN_ESC_X4) if GOLDEN_ESC_X4.exists() else None,
                        help="ESC weights (default: the golden ESC x4 when ../shared is there; else random init)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parse_args(parser, argv)
    if args.child:
        emit(MARKER, child(json.loads(args.child)))
        return 0
    rows = []
    for mode in args.modes:
        case = {"mode": mode, "size": args.size, "scale": args.scale, "tile": args.tile, "threads": args.threads,
                "weights": args.weights, "load": load_average()}
        row = run_mode(case, args.timeout)
        log(f"{mode}: " + (row["error"] if "error" in row else f"{row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB"))
        rows.append(row)
    print(write_results(args.out, rows, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
