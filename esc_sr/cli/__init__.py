"""The ``esc-sr`` command line: plain argparse; every subcommand's parser and handler is in this module.

    esc-sr upscale INPUT... -o OUT [-m MODEL] [--outscale S] [--tile N] ...
    esc-sr info MODEL
    esc-sr convert MODEL OUT.safetensors [--half]
    esc-sr models [--download NAME...]
    esc-sr demo [--out DIR] [-m MODEL] [--image FILE]
    esc-sr export-onnx MODEL OUT.onnx [--half] [--scale N]
    esc-sr chainner install|uninstall [--python PATH]

Handlers are thin: they turn parsed arguments into calls of the library (:mod:`esc_sr.engine`,
:mod:`~esc_sr.images`, :mod:`~esc_sr.hub`, :mod:`~esc_sr.demo`, :mod:`~esc_sr.onnx_export`,
:mod:`~esc_sr.chainner_hook`, :mod:`esc_arch`) and print the result; the library never imports this module.
``upscale`` plans its batch with :mod:`esc_sr.batch` and, under ``torchrun``, shares it between the processes
with :mod:`esc_sr.sharding`.

Errors. An :class:`esc_arch.ESCError` (a problem with the user's input, files or environment) and an
``OSError`` become one line ``esc-sr COMMAND: error: MESSAGE``; exit status 2 for a usage error
(:class:`CliError`: a bad argument, a model that cannot be loaded, no input), else 1. Any other exception is a
bug: one line saying so, exit 1. ``--debug`` adds the traceback. Exit statuses are documented in docs/cli.md.

Import time. Only the standard library is imported here at the top; torch (through esc_arch) is imported by
the handlers, so ``esc-sr --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import functools
import math
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

from . import threads
from .batch import Job, Summary, bad_suffix, collect_inputs, default_suffix, plan_outputs, resolved

__all__ = ["main", "build_parser", "load_cli_model", "describe_model", "CliError", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

PROG = "esc-sr"
ISSUES_URL = "https://github.com/esc-sr/esc-sr/issues"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

# Copies of library constants for help texts and defaults: importing their modules would load torch, which
# `esc-sr --help` must not. tests/test_cli.py checks that they agree.
_DEFAULT_OVERLAP = 64  # esc_sr.engine.DEFAULT_OVERLAP
_DEFAULT_MAX_PARAMETERS = 50_000_000  # esc_arch.checkpoint.DEFAULT_MAX_PARAMETERS
_ONNX_OPSET = 17  # esc_sr.onnx_export.OPSET
_ATTENTION_BACKENDS = ("sdpa", "flex", "naive")  # esc_arch.ATTENTION_BACKENDS
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


# ------------------------------------------------------------------------------------------- errors


def __getattr__(name: str) -> Any:  # PEP 562: ``esc_sr.cli.CliError`` is made on first use
    if name == "CliError":
        return _cli_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _cli_error_class() -> type:
    """The class :class:`CliError`, created on first use: its base, :class:`esc_arch.ESCError`, comes from
    esc_arch, whose import loads torch, and this module must import without it."""
    from esc_arch.errors import ESCError

    class CliError(ESCError):
        """A usage error found by the command line (bad argument, missing input, unusable model): printed
        as one line, exit status ``code`` (2 unless told)."""

        def __init__(self, message: str, code: int = EXIT_USAGE):
            super().__init__(message)
            self.code = code

    CliError.__module__ = __name__
    return CliError


def _usage_error(message: str, code: int = EXIT_USAGE) -> Exception:
    """A :class:`CliError` to raise."""
    return _cli_error_class()(message, code)


def _is_user_error(exc: BaseException) -> bool:
    """True for an :class:`esc_arch.ESCError` (or an ``OSError``): the user's input or environment, not a bug."""
    if isinstance(exc, OSError):
        return True
    # No ESCError can exist unless esc_arch.errors was imported; looking it up leaves torch unloaded otherwise.
    errors = sys.modules.get("esc_arch.errors")
    return errors is not None and isinstance(exc, errors.ESCError)


def _exit_status(exc: BaseException) -> int:
    """A :class:`CliError`'s code (2 unless told), else 1 (no CliError exists unless its class was made)."""
    if _cli_error_class.cache_info().currsize and isinstance(exc, _cli_error_class()):
        return exc.code
    return EXIT_FAILED


def _printable(text: object) -> str:
    """One line of plain characters: a copy of :func:`esc_arch.errors.printable` (which loads torch with esc_arch;
    tests/test_cli.py checks that they agree). Control and format characters (newline, ESC, bidi overrides) and
    undecodable bytes of file names become Python escapes, so a file name can neither split a line nor reach the
    terminal raw."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


def _one_line(exc: BaseException) -> str:
    """The message of a user-facing error on one line; other exceptions get their type name in front."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    text = _printable(text)
    return text if _is_user_error(exc) else f"{type(exc).__name__}: {text}"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that every temporary file is removed on the way out."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _interrupted_status(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED


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
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if handle_term else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(f"{command}: {'terminated' if isinstance(exc, _Terminated) else 'interrupted'}", file=sys.stderr)
        return _interrupted_status(exc)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if _is_user_error(exc):
            print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
            return _exit_status(exc)
        print(
            f"{command}: internal error: {_one_line(exc)} -- this is a bug in esc-sr; "
            + ("please report it with the traceback above" if debug else "please rerun with --debug and report it")
            + f" at {ISSUES_URL}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        if handle_term and signal.getsignal(signal.SIGTERM) is _on_sigterm:  # SIG_IGN: a finished rank (_upscale)
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
    for add in (_add_upscale, _add_info, _add_convert, _add_models, _add_demo, _add_export_onnx, _add_chainner):
        add(subparsers)
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, not 0")
    return value


def _quality_arg(text: str) -> int:
    value = _non_negative_int(text)
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


def _memory_arg(text: str) -> int | str | None:
    """``auto`` (the RAM available when each image starts), ``none`` (no check), or a size: ``16G``, ``512MiB``."""
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower() if text.strip().lower() == "auto" else None
    return _number_with_unit(text, _UNITS)


def _count_arg(text: str) -> int:
    """A count such as ``100000000``, ``100M`` or ``1e8``."""
    return _number_with_unit(text, {"": 1, "k": 10**3, "m": 10**6, "g": 10**9})


def _add_max_parameters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-parameters", type=_count_arg, default=None, metavar="N",
        help=f"refuse checkpoints that declare more parameters (default {_DEFAULT_MAX_PARAMETERS:,}, four times "
        "ESC-XL; the other checkpoint limits follow it)",
    )


def _tile_arg(text: str) -> int | str | None:
    if text.lower() == "auto":
        return "auto"
    value = _non_negative_int(text)
    return None if value == 0 else value


# ------------------------------------------------------------------------------------------- models


def load_cli_model(name: str, *, attention: str | None = None, max_parameters: int | None = None):
    """Load ``-m/--model``: ``default``, a checkpoint path, or an official name (via :mod:`esc_sr.hub`).

    A model that cannot be had is a usage error (:class:`CliError`, exit 2), reported in one line.
    ``max_parameters`` (``--max-parameters``) bounds what the checkpoint may declare (see esc_arch.load_model).
    """
    import esc_arch

    from . import hub

    try:
        source: Any = name
        if name != "default":
            source = hub.resolve_model(name)
            if source.is_dir():
                raise _usage_error(f"{source}: is a directory, not a checkpoint file")
            source = str(source)
        model = esc_arch.load_model(source, max_parameters=max_parameters)
    except (esc_arch.CheckpointError, hub.HubError) as exc:
        raise _usage_error(_one_line(exc)) from exc
    if attention:
        esc_arch.set_attention_backend(model, attention)
    return model


# ------------------------------------------------------------------------------------------ upscale


def _add_upscale(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="upscale image files, folders or glob patterns",
        description=(
            "Upscale images with an ESC model. Inputs are files, folders (their images) or glob "
            "patterns. A bad file is reported and skipped; the exit status is 1 if any failed."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs ('photos/*.jpg')")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder, or an output file name when there is one input file")
    parser.add_argument("-m", "--model", default="default",
                        help="checkpoint file, official name (e.g. ESC_DIV2K_X4) or 'default' (the embedded model)")
    parser.add_argument("-s", "--outscale", type=_positive_float, default=None, metavar="S",
                        help="final scale (default: the model's); other scales resize the model's output "
                        "(chainner-ext Lanczos); the arbitrary-scale model takes it directly")
    parser.add_argument("-t", "--tile", type=_tile_arg, default="auto", metavar="N",
                        help="tile size in input pixels, 'auto' (from free memory; default) or 0 (no tiling)")
    parser.add_argument("--overlap", type=_non_negative_int, default=_DEFAULT_OVERLAP, metavar="PX",
                        help=f"input pixels of context around each crop-overlap tile, the fallback when not even the whole feature maps fit (default {_DEFAULT_OVERLAP})")
    parser.add_argument("--precision", choices=_PRECISIONS, default="auto",
                        help="auto = fp16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps; under torchrun "
                        "auto and cuda mean cuda:LOCAL_RANK")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: for each image, the CPUs not busy with other jobs; under "
                        "torchrun on CPU, the cores divided among the processes of this machine)")
    parser.add_argument("--attention", choices=_ATTENTION_BACKENDS, default=None,
                        help="attention backend (default: the model's)")
    parser.add_argument("--suffix", default=None,
                        help="appended to output file names (default: _x<outscale>, e.g. _x4); '' for none")
    parser.add_argument("--ext", choices=["auto", "png", "jpg", "webp", "tif", "bmp"], default="auto",
                        help="output format (default: same as the input where writable, else png)")
    parser.add_argument("--alpha", choices=["model", "resize"], default="model",
                        help="how to upscale alpha: through the model (default) or a Lanczos resize")
    parser.add_argument("--quality", type=_quality_arg, default=95, metavar="Q",
                        help="JPEG/WebP quality, 0-100 (default 95)")
    parser.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--max-memory", type=_memory_arg, default="auto", metavar="SIZE",
                        help="refuse, before decoding, an image whose job needs more memory (its copies and the "
                        "output at --outscale): 'auto' (default: the RAM available), a size such as 16G, or 'none'")
    _add_max_parameters(parser)
    parser.set_defaults(func=upscale_command)



def upscale_command(args: argparse.Namespace) -> int:
    """Run ``esc-sr upscale``; returns 0 if every image was written or skipped, 1 if any failed.

    Under torchrun each process does its share of the files, and rank 0 prints the one summary and returns the
    run's status (:mod:`esc_sr.sharding`); the other ranks return 0 once they have reported to it.
    """
    from . import sharding

    with sharding.Session.start() as session:
        try:
            return _upscale(args, session)
        except sharding.RootFailed as stop:
            return stop.status  # rank 0 failed a step this rank waited for, and said why


def _upscale(args: argparse.Namespace, session: Any) -> int:
    """The run, on one process or as one rank of several: rank 0 checks the arguments and plans the outputs, every
    rank loads the model (rank 0 first) and upscales its share, and the summaries go to rank 0."""
    from . import engine, heap, sharding

    inputs, input_errors, output, single_file = session.from_root(lambda: _check_inputs(args),
                                                                  exit_status=_exit_status)
    summary = Summary(failed=list(input_errors) if session.is_root else [])
    model, outscale = session.root_first(lambda: _load_upscale_model(args), exit_status=_exit_status)
    model, device, _dtype = engine.prepare_model(model, session.device(args.device), args.precision)
    session.set_threads(args.threads, device.type)

    suffix = default_suffix(outscale) if args.suffix is None else args.suffix
    jobs, mine = session.split(  # collisions are decided on the whole plan, before it is split
        lambda: plan_outputs(inputs, output, suffix=suffix, ext=args.ext, single_file=single_file),
        lambda job: 1 if job.error else sharding.estimate_cost(job.source), exit_status=_exit_status)
    if session.is_root:
        _remove_stale(jobs)

    progress = not args.quiet and sys.stderr.isatty() and session.is_root
    bar = _progress_bar(mine, enabled=progress and len(mine) > 1)
    try:
        # One heap scope for this share: each image reuses the memory the one before freed (esc_sr/heap.py).
        with heap.reusing_freed_memory(device):
            for job in bar:
                status, message, notes = _upscale_one(job, model, args, outscale=outscale, device=device, progress=progress)
                for note in notes:
                    _report(f"{job.source}: warning: {note}", bar)
                if status == "written":
                    summary.written.append(job.target)
                elif status == "skipped":
                    summary.skipped.append(job.target)
                    _report(message, bar)
                else:
                    summary.failed.append((str(job.source), message))
                    _report(f"{job.source}: {message}", bar)
    except KeyboardInterrupt as exc:  # every rank is interrupted (or stopped by torchrun): no exchange
        what = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        _report(f"{what}; files written so far are complete", bar)
        _print_summary(summary, session.label)
        return _interrupted_status(exc)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    try:
        parts = session.gather(summary)  # [summary] on one process; None on ranks other than 0
    except sharding.ShardingError:
        _print_summary(summary, session.label)
        raise
    if parts is None:
        # Another rank: rank 0 reports this rank's files and returns the run's status. When rank 0 exits with
        # status 1, torchrun stops the workers still running with SIGTERM; this one, exiting anyway, ignores it
        # rather than report itself terminated (main() leaves it ignored).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return EXIT_OK
    summary = Summary.merge(parts, jobs)
    _print_summary(summary)
    return EXIT_FAILED if summary.failed else EXIT_OK


def _check_inputs(args: argparse.Namespace) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]], Path, bool]:
    """The checks made before the model is loaded (on rank 0 only, under torchrun), and the expanded inputs:
    ``(inputs, input errors, output, single_file)``. Each input error is reported here."""
    from . import engine, images

    if args.suffix is not None and bad_suffix(args.suffix):
        raise _usage_error(f"--suffix {_printable(args.suffix)!r}: {bad_suffix(args.suffix)}")
    inputs, input_errors = collect_inputs(args.inputs, recursive=args.recursive)
    for argument, reason in input_errors:
        _report(f"{argument}: {reason}")
    if not inputs:
        raise _usage_error("no input images (see above)")

    output = Path(args.output).expanduser()
    single_file = (
        len(inputs) == 1 and len(args.inputs) == 1 and inputs[0][1] is None
        and output.suffix.lower() in images.WRITABLE_EXTENSIONS and not output.is_dir()
    )
    if single_file and args.ext != "auto" and output.suffix.lower() != "." + args.ext:
        raise _usage_error(f"--ext {args.ext} contradicts the output file name {output}")
    if not single_file and (output.exists() or output.is_symlink()) and not output.is_dir():
        raise _usage_error(f"{output}: exists and is not a folder (-o must be a folder here: several inputs, a folder "
                           "or an output name without an image extension)")
    try:
        engine.resolve_precision(args.precision, engine.resolve_device(args.device))
    except engine.EngineError as exc:
        raise _usage_error(f"--device {args.device} --precision {args.precision}: {_one_line(exc)}") from exc
    return inputs, input_errors, output, single_file


def _load_upscale_model(args: argparse.Namespace) -> tuple[Any, float]:
    """``(model, outscale)``: ``-m`` loaded, and the final scale (the arbitrary-scale model needs ``--outscale``)."""
    model = load_cli_model(args.model, attention=args.attention, max_parameters=args.max_parameters)
    if model.arbitrary_scale and args.outscale is None:
        raise _usage_error(f"{args.model}: the arbitrary-scale model needs --outscale (e.g. --outscale 3.5)")
    return model, (args.outscale if args.outscale is not None else float(model.scale))


def _remove_stale(jobs: list[Job]) -> None:
    """Sweep the temporary files that killed runs left in the output folders (:func:`esc_arch.atomic.remove_stale`)."""
    from esc_arch import atomic

    for folder in sorted({job.target.parent for job in jobs if job.target is not None and job.target.parent.is_dir()}):
        removed = atomic.remove_stale(folder)
        if removed:
            _report(f"{folder}: removed {len(removed)} temporary file{'s' * (len(removed) != 1)} left by a killed run "
                    f"({atomic.TEMP_PREFIX}*, untouched for {atomic.STALE_AFTER_SECONDS // 3600} h)")


def _upscale_one(
    job: Job, model, args: argparse.Namespace, *, outscale: float, device, progress: bool
) -> tuple[str, str, list[str]]:
    """Process one image: ('written' | 'skipped' | 'failed', message, warnings). Never raises for a bad file:
    reading, the memory check, the model, resizing and writing all fail for this file alone."""
    from . import engine, images

    if job.error:
        return "failed", job.error, []
    target = job.target
    assert target is not None
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status, message = _process(job.source, target, model, args, outscale=outscale, device=device,
                                       progress=progress)
        except KeyboardInterrupt:
            raise
        except images.ImageReadError as exc:
            status, message = "failed", exc.reason  # the line names the input file already
        except images.ImageWriteError as exc:
            status, message = "failed", f"output {exc}"
        except Exception as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            if engine.is_out_of_memory(exc) and not _is_user_error(exc):
                status, message = "failed", f"out of memory ({_one_line(exc)})"
            else:
                status, message = "failed", _one_line(exc)
        for record in caught:
            note = _printable(" ".join(str(record.message).split()))
            if note not in notes:
                notes.append(note)
    return status, message, notes


def _process(source: Path, target: Path, model, args: argparse.Namespace, *, outscale: float, device,
             progress: bool) -> tuple[str, str]:
    from . import engine, images

    same_as_input = resolved(target) == resolved(source)
    if target.exists() and not args.overwrite:
        what = "is the input file" if same_as_input else "exists"
        return "skipped", f"{target}: skipped, output {what} (use --overwrite to replace it)"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise images.ImageWriteError(target, f"cannot create its folder {target.parent} ({exc.strerror or exc})") from None
    # The declared size first: a job whose output cannot fit is refused before decoding, and before the model.
    info = images.probe_image(source)
    if info is not None:
        engine.check_memory(info.height, info.width, info.channels, model, outscale=outscale,
                            bytes_per_sample=info.bytes_per_sample, alpha=args.alpha, max_memory=args.max_memory)
    image = images.read_image(source, max_memory=args.max_memory)
    result = engine.upscale(
        model, image.pixels, outscale=outscale, tile=args.tile, overlap=args.overlap, device=device,
        precision=args.precision, alpha=args.alpha, progress=progress, max_memory=args.max_memory,
    )
    images.write_image(target, result, quality=args.quality, icc_profile=image.icc_profile)
    return "written", str(target)


def _progress_bar(jobs: list[Job], *, enabled: bool):
    if not enabled:
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="images", unit="img", dynamic_ncols=True)


def _report(message: str, bar: Any = None) -> None:
    message = _printable(message)
    if bar is not None and hasattr(bar, "write"):
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _print_summary(summary: Summary, who: str = "") -> None:
    """The summary; ``who`` (``"rank 1 of 2: "``) when one rank of several reports its own part only."""
    parts = [f"{len(summary.written)} written"]
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} skipped (output exists)")
    parts.append(f"{len(summary.failed)} failed")
    print(f"{PROG} upscale: {who}{', '.join(parts)}", file=sys.stderr)
    if summary.failed:
        print("failed:", file=sys.stderr)
        for name, reason in summary.failed:
            print(_printable(f"  {name}: {reason}"), file=sys.stderr)




# --------------------------------------------------------------------------------------------- info


def _add_info(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a model: variant, scale, hyperparameters, parameters, attention kernel",
        description="Load a checkpoint and describe it, including which attention kernel runs on this device.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file, official name or 'default'")
    parser.add_argument("--device", default="auto", help="device to report the attention kernel for (default auto)")
    parser.add_argument("--precision", choices=_PRECISIONS, default="auto")
    parser.add_argument("--attention", choices=_ATTENTION_BACKENDS, default=None,
                        help="report for this attention backend instead of the model's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_max_parameters(parser)
    parser.set_defaults(func=info_command)


def describe_model(model, *, device, dtype) -> dict[str, Any]:
    """The facts ``esc-sr info`` prints, as a dict."""
    import esc_arch

    return {
        "arch": model.arch_name,
        "preset": esc_arch.match_preset(model),
        "scale": "any (arbitrary-scale)" if model.arbitrary_scale else model.scale,
        "window_size": model.window_size,
        "parameters": esc_arch.count_parameters(model),
        "hyperparameters": dict(model.hyperparameters),
        "attention_backend": model.attn_type,
        "attention_kernel": esc_arch.attention_kernel(model, device, dtype),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def info_command(args: argparse.Namespace) -> int:
    import json

    from . import engine

    try:
        device = engine.resolve_device(args.device)
        dtype = engine.resolve_precision(args.precision, device)
    except engine.EngineError as exc:
        raise _usage_error(f"--device {args.device} --precision {args.precision}: {_one_line(exc)}") from exc
    model = load_cli_model(args.model, attention=args.attention, max_parameters=args.max_parameters)
    facts = describe_model(model, device=device, dtype=dtype)
    facts = {"model": args.model, **facts}
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return EXIT_OK
    hyper = ", ".join(f"{k}={v!r}" for k, v in facts["hyperparameters"].items())
    variant = facts["arch"] + (f" (preset {facts['preset']})" if facts["preset"] else " (custom configuration)")
    lines = [
        f"model:            {facts['model']}",
        f"variant:          {variant}",
        f"scale:            {facts['scale'] if isinstance(facts['scale'], str) else 'x' + str(facts['scale'])}",
        f"window size:      {facts['window_size']} (inputs are reflect-padded to a multiple of it)",
        f"parameters:       {facts['parameters']:,}",
        f"hyperparameters:  {hyper}",
        f"attention:        {facts['attention_backend']} -> {facts['attention_kernel']}",
        f"                  (on {facts['device']}, {facts['dtype']})",
    ]
    print("\n".join(lines))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ convert


def _add_convert(subparsers: Any) -> None:
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
    _add_max_parameters(parser)
    parser.set_defaults(func=convert_command)


def _check_output(out: Path, suffix: str, *, overwrite: bool) -> None:
    if out.suffix.lower() != suffix:
        raise _usage_error(f"{out}: the output must be a {suffix} file")
    if out.exists() and not overwrite:
        raise _usage_error(f"{out}: exists (use --overwrite to replace it)")


def convert_command(args: argparse.Namespace) -> int:
    import esc_arch

    out = Path(args.out).expanduser()
    _check_output(out, ".safetensors", overwrite=args.overwrite)
    model = load_cli_model(args.model, max_parameters=args.max_parameters)
    source = Path(args.model).expanduser()
    if source.exists() and source.resolve() == out.resolve():
        raise _usage_error(f"{out}: is the input checkpoint; write to another file")
    esc_arch.save_model(model, out, half=args.half)
    size = out.stat().st_size
    print(
        f"wrote {out}: {model.arch_name} x{model.scale}, {esc_arch.count_parameters(model):,} parameters, "
        f"{'fp16' if args.half else 'fp32'}, {size / 1e6:.2f} MB"
    )
    return EXIT_OK


# ------------------------------------------------------------------------------------------- models


def _add_models(subparsers: Any) -> None:
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
    from . import hub

    for name in args.download or ():
        path = hub.download_model(name)
        print(f"{hub.lookup(name).name}: {path}")
    print(hub.format_model_table())
    return EXIT_OK


# --------------------------------------------------------------------------------------------- demo


def _add_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="upscale a sample image and write a side-by-side comparison PNG",
        description=(
            "Make a low-resolution copy of a sample image (bicubic), upscale it with ESC and write "
            "comparison.png: LR (nearest), bicubic, ESC and the original, with PSNR (Y channel)."
        ),
    )
    parser.add_argument("--out", "-o", default="esc-sr-demo", help="output folder (default: ./esc-sr-demo)")
    parser.add_argument(
        "--model", "-m", default="default",
        help="'default' (the embedded model), a checkpoint file, or an official name such as ESC_DIV2K_X4",
    )
    parser.add_argument("--image", help="use this HR image instead of the shipped sample")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.set_defaults(func=demo_command)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f} dB"


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo (:func:`esc_sr.demo.run_demo`) and print what it measured and wrote."""
    from .demo import run_demo

    result = run_demo(args.out, model=args.model, image=args.image, device=args.device, progress=sys.stderr.isatty())
    p = result.psnr
    print(f"ESC demo x{result.scale}, model: {result.model_label}")
    print(f"PSNR (Y, crop {result.scale}): nearest {_db(p['nearest'])} | bicubic {_db(p['bicubic'])} | ESC {_db(p['esc'])}")
    print(f"LR input:   {result.lr_image.resolve()}")
    print(f"ESC output: {result.sr_image.resolve()}")
    print(f"wrote comparison: {result.comparison.resolve()}")
    return EXIT_OK


# -------------------------------------------------------------------------------------- export-onnx


def _add_export_onnx(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="export an ESC model to ONNX for chaiNNer / onnxruntime (fp32 or fp16)",
        description=(
            "Export MODEL to ONNX: input 'input' (N,3,H,W) RGB in [0,1], output 'output', clamp inside the "
            f"graph, dynamic batch/height/width, opset {_ONNX_OPSET} -- what chaiNNer's own converter produces. "
            "The graph is checked with onnxruntime against PyTorch at several odd sizes. The arbitrary-scale "
            "model (ESC+LTE) exports at the whole factor given with --scale."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or official model name")
    parser.add_argument("out", metavar="OUT.onnx", help="file to write")
    parser.add_argument("--half", action="store_true", help="fp16 weights and input/output (for GPUs)")
    parser.add_argument("--scale", type=_positive_float, default=None, metavar="N",
                        help="the graph's factor for the arbitrary-scale model (a whole number, e.g. 3); "
                        "other models have their own")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=export_onnx_command)


def export_onnx_command(args: argparse.Namespace) -> int:
    """Export with :func:`esc_sr.onnx_export.export_onnx`; an :class:`OnnxExportError` exits with 1."""
    from . import onnx_export

    out = Path(args.out).expanduser()
    _check_output(out, ".onnx", overwrite=args.overwrite)
    model = load_cli_model(args.model)
    report = onnx_export.export_onnx(model, out, half=args.half, scale=args.scale, verify=not args.no_verify)
    print(f"wrote {out}: {model.arch_name} x{report.scale}, {'fp16' if args.half else 'fp32'}, "
          f"opset {onnx_export.OPSET}, {out.stat().st_size / 1e6:.2f} MB")
    for (batch, height, width), diff in report.max_abs_diff.items():
        print(f"  onnxruntime vs PyTorch at {batch}x3x{height}x{width}: max |diff| {diff:.2e}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------- chainner


def _add_chainner(subparsers: Any) -> None:
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
    from . import chainner_hook

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


if __name__ == "__main__":
    raise SystemExit(main())
