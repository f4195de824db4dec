"""``esc-sr convert MODEL OUT.safetensors [--half]``: any supported checkpoint to a .safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import EXIT_OK, add_max_parameters, check_output, load_cli_model, usage_error

__all__ = ["add_parser", "convert_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert any supported checkpoint to .safetensors (optionally fp16)",
        description=(
            "Read a checkpoint in any supported format (official .pth, BasicSR, neosr, traiNNer-redux, "
            ".safetensors) and write a .safetensors file with the model's metadata, which loads "
            "without executing code. Weights are stored un-fused, as upstream stores them: "
            "esc_arch.fuse() bakes the inference constants in memory, cheaply, after loading."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or official name")
    parser.add_argument("out", metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--half", action="store_true", help="store weights as fp16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_max_parameters(parser)
    parser.set_defaults(func=convert_command)


def convert_command(args: argparse.Namespace) -> int:
    import esc_arch

    from ..checkpoints import save_model

    out = Path(args.out).expanduser()
    check_output(out, ".safetensors", overwrite=args.overwrite)
    model = load_cli_model(args.model, max_parameters=args.max_parameters)
    source = Path(args.model).expanduser()
    if source.exists() and source.resolve() == out.resolve():
        raise usage_error(f"{out}: is the input checkpoint; write to another file")
    save_model(model, out, half=args.half)
    size = out.stat().st_size
    print(
        f"wrote {out}: {model.arch_name} x{model.scale}, {esc_arch.count_parameters(model):,} parameters, "
        f"{'fp16' if args.half else 'fp32'}, {size / 1e6:.2f} MB"
    )
    return EXIT_OK
