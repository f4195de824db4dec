"""``esc-sr export-onnx MODEL OUT.onnx``: the model as an ONNX graph for chaiNNer and onnxruntime
(:mod:`esc_sr.onnx_export`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import facts
from ._common import EXIT_OK, check_output, load_cli_model, positive_float

__all__ = ["add_parser", "export_onnx_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="export an ESC model to ONNX for chaiNNer / onnxruntime (fp32 or fp16)",
        description=(
            "Export MODEL to ONNX: input 'input' (N,3,H,W) RGB in [0,1], output 'output', clamp inside the "
            f"graph, dynamic batch/height/width, opset {facts.ONNX_OPSET} -- what chaiNNer's own converter produces. "
            "The graph is checked with onnxruntime against PyTorch at several odd sizes. The arbitrary-scale "
            "model (ESC+LTE) exports at the whole factor given with --scale."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or official model name")
    parser.add_argument("out", metavar="OUT.onnx", help="file to write")
    parser.add_argument("--half", action="store_true", help="fp16 weights and input/output (for GPUs)")
    parser.add_argument("--scale", type=positive_float, default=None, metavar="N",
                        help="the graph's factor for the arbitrary-scale model (a whole number, e.g. 3); "
                        "other models have their own")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=export_onnx_command)


def export_onnx_command(args: argparse.Namespace) -> int:
    """Export with :func:`esc_sr.onnx_export.export_onnx`; an :class:`OnnxExportError` exits with 1."""
    from .. import onnx_export

    out = Path(args.out).expanduser()
    check_output(out, ".onnx", overwrite=args.overwrite)
    model = load_cli_model(args.model)
    report = onnx_export.export_onnx(model, out, half=args.half, scale=args.scale, verify=not args.no_verify)
    print(f"wrote {out}: {model.arch_name} x{report.scale}, {'fp16' if args.half else 'fp32'}, "
          f"opset {onnx_export.OPSET}, {out.stat().st_size / 1e6:.2f} MB")
    for (batch, height, width), diff in report.max_abs_diff.items():
        print(f"  onnxruntime vs PyTorch at {batch}x3x{height}x{width}: max |diff| {diff:.2e}")
    return EXIT_OK
