"""``esc-sr models [--download NAME...]``: the official weights (:mod:`esc_sr.hub`), cached or not."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_OK

__all__ = ["add_parser", "models_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the official ESC weights and whether they are cached; download them ahead of time",
        description=(
            "List the official ESC checkpoints (github.com/dslisleedh/ESC, release 1.0.0) that "
            "'esc-sr upscale -m NAME' downloads on first use, and where they are cached."
        ),
    )
    parser.add_argument(
        "--download", nargs="+", metavar="NAME",
        help="download these models into the cache now (e.g. before going offline)",
    )
    parser.set_defaults(func=models_command)


def models_command(args: argparse.Namespace) -> int:
    """Download what was asked for, then print the registry table."""
    from .. import hub

    for name in args.download or ():
        path = hub.download_model(name)
        print(f"{hub.lookup(name).name}: {path}")
    print(hub.format_model_table())
    return EXIT_OK
