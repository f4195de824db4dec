"""The ``esc-sr`` command line: plain argparse, one module per subcommand.

    esc-sr upscale INPUT... -o OUT [-m MODEL] [--outscale S] [--tile N] ...      upscale.py
    esc-sr info MODEL                                                            info.py
    esc-sr convert MODEL OUT.safetensors [--half]                                convert.py
    esc-sr models [--download NAME...]                                           models.py
    esc-sr demo [--out DIR] [-m MODEL] [--image FILE]                            demo.py
    esc-sr export-onnx MODEL OUT.onnx [--half] [--scale N]                       export_onnx.py
    esc-sr chainner install|uninstall [--python PATH]                            chainner.py

Each subcommand module has ``add_parser(subparsers)`` and its handler ``<name>_command(args) -> int`` (the exit
status). Handlers are thin: they turn parsed arguments into calls of the library (:mod:`esc_sr.engine`,
:mod:`~esc_sr.images`, :mod:`~esc_sr.hub`, :mod:`~esc_sr.demo`, :mod:`~esc_sr.onnx_export`,
:mod:`~esc_sr.chainner_hook`, :mod:`esc_arch`) and print the result; the library never imports this package.
What they share (exit statuses, :class:`CliError`, one-line messages, argument types, loading ``-m``) is in
``_common.py``; the choices and defaults they offer come from :mod:`esc_sr.facts`, as the ComfyUI nodes' do.

Errors. An :class:`esc_arch.ESCError` (a problem with the user's input, files or environment) and an
``OSError`` become one line ``esc-sr COMMAND: error: MESSAGE``; exit status 2 for a usage error
(:class:`CliError`: a bad argument, a model that cannot be loaded, no input), else 1. Any other exception is a
bug: one line saying so, exit 1. ``--debug`` adds the traceback. Exit statuses are documented in docs/cli.md.

Import time. Only the standard library (and the torch-free :mod:`esc_sr.facts`, :mod:`esc_sr.batch`,
:mod:`esc_sr.threads`) is imported at the top of these modules; torch (through esc_arch) is imported by the
handlers, so ``esc-sr --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from typing import Any, Sequence

from .. import facts, threads
from . import chainner, convert, demo, export_onnx, info, models, upscale
from ._common import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, ISSUES_URL, PROG, Terminated,
    cli_error_class, exit_status, interrupted_status, is_user_error, load_cli_model, on_sigterm, one_line,
    printable as _printable,  # tests/test_hostile_inputs.py compares it with esc_arch.errors.printable
)
from .info import describe_model, info_command  # re-exported: the handlers were module-level in cli.py
from .upscale import upscale_command

__all__ = ["main", "build_parser", "load_cli_model", "describe_model", "CliError", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

# The subcommands, in the order ``esc-sr --help`` lists them.
COMMANDS = (upscale, info, convert, models, demo, export_onnx, chainner)

_DEFAULT_MAX_PARAMETERS = facts.DEFAULT_MAX_PARAMETERS  # the name tests/test_hostile_inputs.py checks


def __getattr__(name: str) -> Any:  # PEP 562: ``esc_sr.cli.CliError`` is made on first use (_common.py)
    if name == "CliError":
        return cli_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esc-sr`` console script; returns the exit status.

    Argument errors exit through argparse (``SystemExit(2)``) before anything runs.
    """
    threads.configure_environment()  # the OpenMP wait policy: only before torch is loaded (esc_sr/threads.py)
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    command = f"{PROG} {args.command}"
    debug = getattr(args, "debug", False)
    # SIGTERM (a service manager, `kill`, a closed job) unwinds like Ctrl-C: atomic writes remove their temporary
    # files, and upscale prints its summary. Only the main thread can install a handler.
    handle_term = hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if handle_term else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"{command}: {'terminated' if isinstance(exc, Terminated) else 'interrupted'}", file=sys.stderr)
        return interrupted_status(exc)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if is_user_error(exc):
            print(f"{command}: error: {one_line(exc)}", file=sys.stderr)
            return exit_status(exc)
        print(
            f"{command}: internal error: {one_line(exc)} -- this is a bug in esc-sr; "
            + ("please report it with the traceback above" if debug else "please rerun with --debug and report it")
            + f" at {ISSUES_URL}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if handle_term and signal.getsignal(signal.SIGTERM) is on_sigterm:  # SIG_IGN: a finished rank (upscale.py)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``esc-sr`` parser with every subcommand (building it imports nothing beyond the standard library)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ESC super-resolution: upscale images, inspect and convert ESC checkpoints.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show program's version number and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    _accept_debug_everywhere(subparsers)
    return parser


class _VersionAction(argparse.Action):
    """``--version``, reading the version (from esc_arch, hence torch) only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        from esc_arch import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


def _accept_debug_everywhere(subparsers: Any) -> None:
    """``--debug`` after the subcommand too (``esc-sr upscale ... --debug``, ``esc-sr chainner install --debug``)."""
    for sub in subparsers.choices.values():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_everywhere(action)
