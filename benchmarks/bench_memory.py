"""Peak memory of ``esc_sr.upscale`` on a large image: memory is bounded by the tile, not the image.

    python -m benchmarks bench_memory                                   # 3840x2160 x2, esc_tiny, tile auto
    python -m benchmarks bench_memory --preset esc --size 1920x1080

The upscale runs in a fresh Python process, the way ``esc-sr upscale`` runs it: a uint8 HxWx3 array in,
a uint8 array out, ``tile='auto'``, fp32 on CPU. Reported: the absolute peak resident set size of that
process (VmHWM, libraries included) over the whole run, the RSS after imports, the tile size chosen
and the wall time. The dynamic-kernel predictors get random weights (``--untrained`` keeps upstream's
zero init): trained models have them, and they make the engine do its statistics pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import (
    MIB, RESULTS_DIR, current_rss_bytes, emit, log, parse_args, parse_size, peak_rss_bytes, run_child, script_parser,
    write_payload,
)

MARKER = "BENCH-MEMORY-RESULT "


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one upscale in this (fresh) process and measure it."""
    rss_start = current_rss_bytes()
    import numpy as np
    import torch

    import esc_arch
    from esc_sr import engine

    rss_imports = current_rss_bytes()
    torch.manual_seed(0)
    model = esc_arch.PRESETS[args.preset](args.scale).eval()
    if not args.untrained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Sequential) and isinstance(module[0], torch.nn.AdaptiveAvgPool2d):
                    for tensor in (module[-1].weight, module[-1].bias):
                        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    width, height = args.size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    tile = None if args.tile == "0" else ("auto" if args.tile == "auto" else int(args.tile))
    chosen = engine.auto_tile_size(model, torch.device("cpu"), torch.float32) if tile == "auto" else tile
    rss_ready = current_rss_bytes()

    start = time.perf_counter()
    out = engine.upscale(model, image, tile=tile, precision="fp32", device="cpu")
    seconds = time.perf_counter() - start
    assert out.shape == (height * args.scale, width * args.scale, 3) and out.dtype == np.uint8
    return {
        "preset": args.preset,
        "scale": args.scale,
        "input": f"{width}x{height}",
        "output": f"{out.shape[1]}x{out.shape[0]}",
        "tile": chosen,
        "overlap": engine.DEFAULT_OVERLAP,
        "dynamic_kernels": not args.untrained,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_bytes() / MIB, 1),
        "rss_at_start_mb": round((rss_start or 0) / MIB, 1),
        "rss_after_imports_mb": round((rss_imports or 0) / MIB, 1),
        "rss_before_upscale_mb": round((rss_ready or 0) / MIB, 1),
        "output_bytes_mb": round(out.nbytes / MIB, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, out=RESULTS_DIR / "bench_memory.json")
    parser.add_argument("--preset", default="esc_tiny", help="esc_arch preset (default esc_tiny, the default model's)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--size", type=parse_size, default=(3840, 2160), help="WIDTHxHEIGHT (default 3840x2160)")
    parser.add_argument("--tile", default="auto", help="auto, 0 (no tiling) or a size")
    parser.add_argument("--untrained", action="store_true", help="keep the zero-initialised dynamic kernels")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parse_args(parser, argv)

    if args.child:
        emit(MARKER, child(args))
        return 0

    command = ["--child", "--preset", args.preset, "--scale", str(args.scale), "--size", f"{args.size[0]}x{args.size[1]}",
               "--tile", args.tile] + (["--untrained"] if args.untrained else [])
    log(f"upscaling {args.size[0]}x{args.size[1]} x{args.scale} with {args.preset} in a fresh process")
    result = run_child("benchmarks.bench_memory", command, MARKER)
    if "error" in result:
        print(result.get("stderr_tail", result["error"]), file=sys.stderr)
        return 1
    write_payload(args.out, {"result": result})
    print(
        f"{result['preset']} x{result['scale']}: {result['input']} -> {result['output']}, tile {result['tile']} "
        f"(+{result['overlap']} px context): peak RSS {result['peak_rss_mb'] / 1024:.2f} GiB "
        f"(after imports {result['rss_after_imports_mb']:.0f} MiB), {result['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
