"""Tiled vs untiled ``upscale``: the largest 8-bit difference for a range of overlaps (the seam check).

    python -m benchmarks bench_seams                                  # golden ESC x4 weights, a photo crop
    python -m benchmarks bench_seams --tile 128 --overlaps 0 32 64 96

Small tiles make many borders, so the worst case shows quickly. The default photo is a 256x192 crop of a
SunHays80 image in ../shared; the default model, the trained upstream ESC x4 checkpoint of the golden
fixtures. This is how ``esc_sr.engine.DEFAULT_OVERLAP`` was chosen.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import GOLDEN_DIR, RESULTS_DIR, SHARED_DIR, log, parse_args, script_parser, write_payload

DEFAULT_MODEL = GOLDEN_DIR / "esc_x4.ckpt.pth"
DEFAULT_PHOTO = SHARED_DIR / "data" / "train" / "SunHays80" / "aqueduct_sun_ancegghzusmmvzjn.jpg"


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from esc_sr import engine
    from esc_sr.cli import load_cli_model

    parser = script_parser(__doc__, out=RESULTS_DIR / "bench_seams.json")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    parser.add_argument("--crop", default="300,200,556,392", help="left,top,right,bottom (default a 256x192 crop)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlaps", type=int, nargs="+", default=[0, 32, 64])
    args = parse_args(parser, argv)

    model = load_cli_model(args.model)
    box = tuple(int(v) for v in args.crop.split(","))
    photo = np.asarray(Image.open(args.photo).convert("RGB").crop(box))
    log(f"untiled {photo.shape[1]}x{photo.shape[0]}")
    untiled = engine.upscale(model, photo, tile=None, precision="fp32", device="cpu")
    rows = []
    for overlap in args.overlaps:
        start = time.perf_counter()
        tiled = engine.upscale(model, photo, tile=args.tile, overlap=overlap, precision="fp32", device="cpu")
        diff = np.abs(tiled.astype(int) - untiled.astype(int))
        rows.append({"tile": args.tile, "overlap": overlap, "max_abs_8bit": int(diff.max()),
                     "share_above_1": float((diff > 1).mean()), "seconds": round(time.perf_counter() - start, 1)})
        log(str(rows[-1]))
    write_payload(args.out, {"model": args.model, "photo": str(args.photo), "crop": box, "rows": rows})
    print(f"tiled ({args.tile} px tiles) vs untiled, {Path(args.model).name}, {photo.shape[1]}x{photo.shape[0]} crop\n")
    print("| overlap | max abs diff (8-bit) | pixels off by > 1 |")
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['overlap']} | {row['max_abs_8bit']} | {100 * row['share_above_1']:.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
