"""``esc-sr chainner install|uninstall [--python PATH]``: the spandrel hook in chaiNNer's Python
(:mod:`esc_sr.chainner_hook`)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import EXIT_OK

__all__ = ["add_parser", "chainner_command"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chainner",
        help="set up chaiNNer's Python so its PyTorch nodes load ESC .pth/.safetensors models (or undo it)",
        description=(
            "chaiNNer loads PyTorch models with spandrel and imports no plugins. 'install' installs this "
            "esc-sr into chaiNNer's Python (offline, from the wheel, installed files or source folder it was "
            "installed from; pip --no-deps, so that Python's torch is not touched), then puts a small startup "
            "hook (a .pth file) into its site-packages that registers the ESC architectures with spandrel when "
            "spandrel is imported. 'uninstall' reverses both. Close chaiNNer first, restart it afterwards."
        ),
    )
    actions = parser.add_subparsers(dest="chainner_action", metavar="ACTION", required=True)
    for name, text in (
        ("install", "install this esc-sr and the hook into PYTHON"),
        ("uninstall", "remove the hook and the esc-sr that install put into PYTHON"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument(
            "--python", metavar="PATH", default=None,
            help="the Python executable chaiNNer runs (its integrated Python); default: this Python",
        )
        if name == "install":
            action.add_argument(
                "--hook-only", action="store_true",
                help="only the hook: leave PYTHON's packages alone (esc-sr must be importable there)",
            )
            action.add_argument(
                "--no-check", action="store_true",
                help="with --hook-only: install the hook even if esc-sr is not importable in PYTHON",
            )
        action.set_defaults(func=chainner_command)


def chainner_command(args: argparse.Namespace) -> int:
    """Install or remove the hook (:mod:`esc_sr.chainner_hook`); a :class:`HookError` exits with 1."""
    from .. import chainner_hook

    if args.chainner_action == "install":
        done = chainner_hook.install(args.python, hook_only=args.hook_only, check=not args.no_check)
        where = done.where
        if done.package is not None:
            torch = f"its torch {where.torch_version} untouched" if where.torch_version else "no dependencies installed"
            print(f"installed {done.package} into {where.python} (pip --no-deps --no-index; {torch})")
        print(f"installed {where.pth_file} and {where.module_file.name} for {where.python}")
        for note in done.notes:
            print(f"note: {note}")
        if not where.esc_arch_importable:
            print(f"note: esc-sr is not importable in {where.python}: run this without --hook-only")
        print("restart chaiNNer; ESC .pth/.safetensors models then load in its PyTorch 'Load Model' node")
    else:
        done = chainner_hook.uninstall(args.python)
        if done.removed:
            print(f"removed {', '.join(str(p) for p in done.removed)}")
        else:
            print(f"no esc-sr hook in {done.where.site_packages}; nothing to remove")
        if done.package is not None:
            print(f"uninstalled {done.package} from {done.where.python}")
        for note in done.notes:
            print(f"note: {note}")
    return EXIT_OK
