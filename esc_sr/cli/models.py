"""``esc-sr models [--download NAME...]``: the embedded models (:data:`esc_arch.EMBEDDED_MODELS`), which one
``esc-sr upscale`` uses without ``-m`` (:mod:`esc_sr.model_choice`), and the official weights (:mod:`esc_sr.hub`),
cached or not."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_OK

__all__ = ["add_parser", "models_command", "format_embedded_table"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the embedded models and the official ESC weights (cached or not); download them ahead of time",
        description=(
            "List the models embedded in the package ('esc-sr upscale -m NAME', no download), which one "
            "'esc-sr upscale' uses when -m is not given, and the official ESC checkpoints "
            "(github.com/dslisleedh/ESC, release 1.0.0) that 'esc-sr upscale -m NAME' downloads on first use, "
            "and where they are cached."
        ),
    )
    parser.add_argument(
        "--download", nargs="+", metavar="NAME",
        help="download these models into the cache now (e.g. before going offline)",
    )
    parser.set_defaults(func=models_command)


def format_embedded_table() -> str:
    """The embedded models as a text table: what each is, its held-out quality and where it is used without -m."""
    import esc_arch
    from esc_arch.checkpoint import read_checkpoint

    from .. import model_choice

    used = model_choice.rule()
    rows = []
    for name, path in esc_arch.EMBEDDED_MODELS.items():
        model = esc_arch.load_model(name)
        description = read_checkpoint(path)[1].get("description")
        iterations = description.get("iterations") if isinstance(description, dict) else None
        measured = model_choice.MEASURED.get(name)
        quality = " / ".join(f"{measured[row][0]:.2f}" for row in ("web", "camera", "clean")) if measured else "-"
        rows.append((name, f"x{model.scale}", model.arch_name, f"{esc_arch.count_parameters(model):,}",
                     f"{iterations:,}" if isinstance(iterations, int) else "-", f"{path.stat().st_size / 1e3:.0f} kB",
                     quality, ", ".join(fmt for fmt, chosen in used.items() if chosen == name) or "-"))
    header = ("NAME", "SCALE", "ARCH", "PARAMS", "ITERATIONS", "FILE", "PSNR-Y WEB / CAMERA / CLEAN", "WITHOUT -m")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["Embedded models (in the package, no download): esc-sr upscale -m NAME", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines += [
        "",
        "PSNR-Y (dB): 20 held-out photos, x4 from web JPEGs / camera photos / clean bicubic "
        f"({model_choice.MEASUREMENT}).",
        "Without -m, esc-sr upscale uses: " + ", ".join(f"{fmt} inputs -> {chosen}" for fmt, chosen in used.items())
        + " (the rule that reads these numbers: esc_sr/model_choice.py).",
        "Model cards: esc_arch/weights/*.md",
    ]
    return "\n".join(lines)


def models_command(args: argparse.Namespace) -> int:
    """Download what was asked for, then print the embedded models and the registry table."""
    from .. import hub

    for name in args.download or ():
        path = hub.download_model(name)
        print(f"{hub.lookup(name).name}: {path}")
    print(format_embedded_table())
    print()
    print(hub.format_model_table())
    return EXIT_OK
