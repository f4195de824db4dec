"""``esc-sr demo``: a sample image downscaled, upscaled and compared (:mod:`esc_sr.demo`)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ._common import EXIT_OK

__all__ = ["add_parser", "demo_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="upscale a sample image and write a side-by-side comparison PNG",
        description=(
            "Make two low-resolution copies of a sample image (bicubic, and bicubic saved as a JPEG at quality 40), "
            "upscale them with the embedded models (or -m MODEL) and write comparison.png: one row per input with "
            "LR (nearest), bicubic, each model and the original, with PSNR (Y channel)."
        ),
    )
    parser.add_argument("--out", "-o", default="esc-sr-demo", help="output folder (default: ./esc-sr-demo)")
    parser.add_argument(
        "--model", "-m", default=None,
        help="one model instead of the embedded ones (default: all of them, side by side): an embedded model's "
        "name, a checkpoint file, or an official name such as ESC_DIV2K_X4",
    )
    parser.add_argument("--image", help="use this HR image instead of the shipped sample")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.set_defaults(func=demo_command)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f} dB"


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo (:func:`esc_sr.demo.run_demo`) and print what it measured and wrote."""
    from ..demo import run_demo

    result = run_demo(args.out, model=args.model, image=args.image, device=args.device, progress=sys.stderr.isatty())
    print(f"ESC demo x{result.scale}, model: {result.model_label}")
    for kind, p in result.psnr_by_input.items():
        models = " | ".join(f"{name} {_db(p[name])}" for name in result.models)
        print(f"PSNR (Y, crop {result.scale}), {kind + ' input:':<15} nearest {_db(p['nearest'])} | "
              f"bicubic {_db(p['bicubic'])} | {models}")
    print(f"LR input:   {result.lr_image.resolve()}")
    print(f"JPEG input: {result.jpeg_image.resolve()}")
    print(f"ESC output: {result.sr_image.resolve()}  ({result.models[0]}, clean input)")
    print(f"wrote comparison: {result.comparison.resolve()}")
    return EXIT_OK
