"""What the subcommands of ``esc-sr`` share: exit statuses, the usage error, one-line messages, argument types, and
loading ``-m/--model``.

Only the standard library is imported at the top (with :mod:`esc_sr.facts`, which imports nothing): ``esc-sr
--help`` and argument errors must answer without loading torch.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import Any

from .. import facts

PROG = "esc-sr"
ISSUES_URL = "https://github.com/esc-sr/esc-sr/issues"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


# ------------------------------------------------------------------------------------------- errors


@functools.lru_cache(maxsize=None)
def cli_error_class() -> type:
    """The class :class:`CliError`, created on first use: its base, :class:`esc_arch.ESCError`, comes from
    esc_arch, whose import loads torch, and this module must import without it."""
    from esc_arch.errors import ESCError

    class CliError(ESCError):
        """A usage error found by the command line (bad argument, missing input, unusable model): printed
        as one line, exit status ``code`` (2 unless told)."""

        def __init__(self, message: str, code: int = EXIT_USAGE):
            super().__init__(message)
            self.code = code

    CliError.__module__ = "esc_sr.cli"  # where users find it: esc_sr.cli.CliError
    return CliError


def usage_error(message: str, code: int = EXIT_USAGE) -> Exception:
    """A :class:`CliError` to raise."""
    return cli_error_class()(message, code)


def is_user_error(exc: BaseException) -> bool:
    """True for an :class:`esc_arch.ESCError` (or an ``OSError``): the user's input or environment, not a bug."""
    if isinstance(exc, OSError):
        return True
    # No ESCError can exist unless esc_arch.errors was imported; looking it up leaves torch unloaded otherwise.
    errors = sys.modules.get("esc_arch.errors")
    return errors is not None and isinstance(exc, errors.ESCError)


def exit_status(exc: BaseException) -> int:
    """A :class:`CliError`'s code (2 unless told), else 1 (no CliError exists unless its class was made)."""
    if cli_error_class.cache_info().currsize and isinstance(exc, cli_error_class()):
        return exc.code
    return EXIT_FAILED


def printable(text: object) -> str:
    """One line of plain characters: a copy of :func:`esc_arch.errors.printable` (which loads torch with esc_arch;
    tests/test_hostile_inputs.py checks that they agree). Control and format characters (newline, ESC, bidi overrides) and
    undecodable bytes of file names become Python escapes, so a file name can neither split a line nor reach the
    terminal raw."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


def one_line(exc: BaseException) -> str:
    """The message of a user-facing error on one line; other exceptions get their type name in front."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    text = printable(text)
    return text if is_user_error(exc) else f"{type(exc).__name__}: {text}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that every temporary file is removed on the way out."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def interrupted_status(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------- arguments


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, not 0")
    return value


def quality_arg(text: str) -> int:
    value = non_negative_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be from 0 to 100, not {text}")
    return value


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _number_with_unit(text: str, units: dict[str, int]) -> int:
    stripped = text.strip().lower().replace("_", "").replace(",", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return int(value)


def memory_arg(text: str) -> int | str | None:
    """``auto`` (the RAM available when each image starts), ``none`` (no check), or a size: ``16G``, ``512MiB``."""
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower() if text.strip().lower() == "auto" else None
    return _number_with_unit(text, _UNITS)


def count_arg(text: str) -> int:
    """A count such as ``100000000``, ``100M`` or ``1e8``."""
    return _number_with_unit(text, {"": 1, "k": 10**3, "m": 10**6, "g": 10**9})


def add_max_parameters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-parameters", type=count_arg, default=None, metavar="N",
        help=f"refuse checkpoints that declare more parameters (default {facts.DEFAULT_MAX_PARAMETERS:,}, four times "
        "ESC-XL; the other checkpoint limits follow it)",
    )


def tile_arg(text: str) -> int | str | None:
    if text.lower() == "auto":
        return "auto"
    value = non_negative_int(text)
    return None if value == 0 else value


def check_output(out: Path, suffix: str, *, overwrite: bool) -> None:
    if out.suffix.lower() != suffix:
        raise usage_error(f"{out}: the output must be a {suffix} file")
    if out.is_dir():  # before any work; --overwrite replaces files, not folders
        raise usage_error(f"{out}: is a directory, not a file")
    if out.exists() and not overwrite:
        raise usage_error(f"{out}: exists (use --overwrite to replace it)")


# -------------------------------------------------------------------------------------------- model


def load_cli_model(name: str, *, attention: str | None = None, max_parameters: int | None = None):
    """Load ``-m/--model``: ``default``, a checkpoint path, or an official name (via :mod:`esc_sr.hub`).

    A model that cannot be had is a usage error (:class:`CliError`, exit 2), reported in one line.
    ``max_parameters`` (``--max-parameters``) bounds what the checkpoint may declare (see esc_arch.load_model).
    """
    import esc_arch

    from .. import hub

    try:
        source: Any = name
        if name not in esc_arch.EMBEDDED_MODELS:
            source = hub.resolve_model(name)
            if source.is_dir():
                raise usage_error(f"{source}: is a directory, not a checkpoint file")
            source = str(source)
        model = esc_arch.load_model(source, max_parameters=max_parameters)
    except (esc_arch.CheckpointError, hub.HubError) as exc:
        raise usage_error(one_line(exc)) from exc
    if attention:
        esc_arch.set_attention_backend(model, attention)
    return model
