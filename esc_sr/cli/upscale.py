"""``esc-sr upscale INPUT... -o OUT``: image files, folders or globs through :func:`esc_sr.upscale`.

The batch is planned by :mod:`esc_sr.batch` (which files, which outputs) and, under ``torchrun``, shared between
the processes by :mod:`esc_sr.sharding`. A bad file is reported and skipped; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

from .. import facts
from ..batch import Job, Summary, bad_suffix, collect_inputs, default_suffix, plan_outputs, resolved
from ._common import (
    EXIT_FAILED, EXIT_OK, PROG, Terminated, add_max_parameters, exit_status, interrupted_status, is_user_error,
    load_cli_model, memory_arg, non_negative_int, one_line, positive_float, positive_int, printable, quality_arg,
    tile_arg, usage_error,
)

__all__ = ["add_parser", "upscale_command"]


def add_parser(subparsers: Any) -> None:
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
    parser.add_argument("-m", "--model", default=None,
                        help="checkpoint file, official name (e.g. ESC_DIV2K_X4) or an embedded model's name (esc-sr "
                        "models lists them); default: the embedded model measured best for the inputs' format "
                        "(esc_sr/model_choice.py)")
    parser.add_argument("-s", "--outscale", type=positive_float, default=None, metavar="S",
                        help="final scale (default: the model's); other scales resize the model's output "
                        "(chainner-ext Lanczos); the arbitrary-scale model takes it directly")
    parser.add_argument("-t", "--tile", type=tile_arg, default=facts.DEFAULT_TILE, metavar="N",
                        help="tile size in input pixels, 'auto' (from free memory; default) or 0 (no tiling)")
    parser.add_argument("--overlap", type=non_negative_int, default=facts.DEFAULT_OVERLAP, metavar="PX",
                        help=f"input pixels of context around each crop-overlap tile, the fallback when not even the whole feature maps fit (default {facts.DEFAULT_OVERLAP})")
    parser.add_argument("--precision", choices=facts.PRECISIONS, default=facts.DEFAULT_PRECISION,
                        help="auto = fp16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps; under torchrun "
                        "auto and cuda mean cuda:LOCAL_RANK")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: for each image, the CPUs not busy with other jobs; under "
                        "torchrun on CPU, the cores divided among the processes of this machine)")
    parser.add_argument("--attention", choices=facts.ATTENTION_BACKENDS, default=None,
                        help="attention backend (default: the model's)")
    parser.add_argument("--suffix", default=None,
                        help="appended to output file names (default: _x<outscale>, e.g. _x4); '' for none")
    parser.add_argument("--ext", choices=["auto", "png", "jpg", "webp", "tif", "bmp"], default="auto",
                        help="output format (default: same as the input where writable, else png)")
    parser.add_argument("--alpha", choices=facts.ALPHA_MODES, default=facts.DEFAULT_ALPHA,
                        help="how to upscale alpha: through the model (default) or a Lanczos resize")
    parser.add_argument("--quality", type=quality_arg, default=95, metavar="Q",
                        help="JPEG/WebP quality, 0-100 (default 95)")
    parser.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--max-memory", type=memory_arg, default="auto", metavar="SIZE",
                        help="refuse, before decoding, an image whose job needs more memory (its copies and the "
                        "output at --outscale): 'auto' (default: the RAM available), a size such as 16G, or 'none'")
    add_max_parameters(parser)
    parser.set_defaults(func=upscale_command)


def upscale_command(args: argparse.Namespace) -> int:
    """Run ``esc-sr upscale``; returns 0 if every image was written or skipped, 1 if any failed.

    Under torchrun each process does its share of the files, and rank 0 prints the one summary and returns the
    run's status (:mod:`esc_sr.sharding`); the other ranks return 0 once they have reported to it.
    """
    from .. import sharding

    with sharding.Session.start() as session:
        try:
            return _upscale(args, session)
        except sharding.RootFailed as stop:
            return stop.status  # rank 0 failed a step this rank waited for, and said why


def _upscale(args: argparse.Namespace, session: Any) -> int:
    """The run, on one process or as one rank of several: rank 0 checks the arguments and plans the outputs, every
    rank loads the model (rank 0 first) and upscales its share, and the summaries go to rank 0."""
    from .. import engine, scopes, sharding

    inputs, input_errors, output, single_file = session.from_root(lambda: _check_inputs(args),
                                                                  exit_status=exit_status)
    summary = Summary(failed=list(input_errors) if session.is_root else [])
    model, outscale = session.root_first(lambda: _load_upscale_model(args, inputs), exit_status=exit_status)
    model, device, _dtype = engine.prepare_model(model, session.device(args.device), args.precision)
    session.set_threads(args.threads, device.type)

    suffix = default_suffix(outscale) if args.suffix is None else args.suffix
    jobs, mine = session.split(  # collisions are decided on the whole plan, before it is split
        lambda: plan_outputs(inputs, output, suffix=suffix, ext=args.ext, single_file=single_file),
        lambda job: 1 if job.error else sharding.estimate_cost(job.source), exit_status=exit_status)
    if session.is_root:
        _remove_stale(jobs)

    progress = not args.quiet and sys.stderr.isatty() and session.is_root
    bar = _progress_bar(mine, enabled=progress and len(mine) > 1)
    process_notes: set[str] = set()
    try:
        # One batch scope for this share: each image reuses the memory the one before freed (esc_sr/scopes.py).
        with scopes.batch(device):
            for job in bar:
                status, message, notes = _upscale_one(job, model, args, outscale=outscale, device=device, progress=progress)
                for about_image, note in notes:
                    if about_image:
                        _report(f"{job.source}: warning: {note}", bar)
                    elif note not in process_notes:  # the runtime's or torch's: once, not as an image's
                        process_notes.add(note)
                        _report(f"{PROG} upscale: warning: {note}", bar)
                if status == "written":
                    summary.written.append(job.target)
                elif status == "skipped":
                    summary.skipped.append(job.target)
                    _report(message, bar)
                else:
                    summary.failed.append((str(job.source), message))
                    _report(f"{job.source}: {message}", bar)
    except KeyboardInterrupt as exc:  # every rank is interrupted (or stopped by torchrun): no exchange
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        _report(f"{what}; files written so far are complete", bar)
        _print_summary(summary, session.label)
        return interrupted_status(exc)
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
    from .. import engine, images

    if args.suffix is not None and bad_suffix(args.suffix):
        raise usage_error(f"--suffix {printable(args.suffix)!r}: {bad_suffix(args.suffix)}")
    inputs, input_errors = collect_inputs(args.inputs, recursive=args.recursive)
    for argument, reason in input_errors:
        _report(f"{argument}: {reason}")
    if not inputs:
        raise usage_error("no input images (see above)")

    output = Path(args.output).expanduser()
    single_file = (
        len(inputs) == 1 and len(args.inputs) == 1 and inputs[0][1] is None
        and output.suffix.lower() in images.WRITABLE_EXTENSIONS and not output.is_dir()
    )
    if single_file and args.ext != "auto" and output.suffix.lower() != "." + args.ext:
        raise usage_error(f"--ext {args.ext} contradicts the output file name {output}")
    if not single_file and (output.exists() or output.is_symlink()) and not output.is_dir():
        raise usage_error(f"{output}: exists and is not a folder (-o must be a folder here: several inputs, a folder "
                           "or an output name without an image extension)")
    try:
        engine.resolve_precision(args.precision, engine.resolve_device(args.device))
    except engine.EngineError as exc:
        raise usage_error(f"--device {args.device} --precision {args.precision}: {one_line(exc)}") from exc
    return inputs, input_errors, output, single_file


def _load_upscale_model(args: argparse.Namespace, inputs: list[tuple[Path, Path | None]] = ()) -> tuple[Any, float]:
    """``(model, outscale)``: ``-m`` loaded, and the final scale (the arbitrary-scale model needs ``--outscale``)."""
    if args.model is None:  # no -m: the embedded model the measured rule picks for these inputs
        from ..model_choice import choose_for_batch

        args.model = choose_for_batch(source for source, _ in inputs)
    model = load_cli_model(args.model, attention=args.attention, max_parameters=args.max_parameters)
    if model.arbitrary_scale and args.outscale is None:
        raise usage_error(f"{args.model}: the arbitrary-scale model needs --outscale (e.g. --outscale 3.5)")
    return model, (args.outscale if args.outscale is not None else float(model.scale))


def _remove_stale(jobs: list[Job]) -> None:
    """Sweep the temporary files that killed runs left in the output folders (:func:`esc_sr.atomic.remove_stale`)."""
    from esc_sr import atomic

    for folder in sorted({job.target.parent for job in jobs if job.target is not None and job.target.parent.is_dir()}):
        removed = atomic.remove_stale(folder)
        if removed:
            _report(f"{folder}: removed {len(removed)} temporary file{'s' * (len(removed) != 1)} left by a killed run "
                    f"({atomic.TEMP_PREFIX}*, untouched for {atomic.STALE_AFTER_SECONDS // 3600} h)")


def _upscale_one(
    job: Job, model, args: argparse.Namespace, *, outscale: float, device, progress: bool
) -> tuple[str, str, list[tuple[bool, str]]]:
    """Process one image: ('written' | 'skipped' | 'failed', message, warnings as (about the image?, text)). Never
    raises for a bad file: reading, the memory check, the model, resizing and writing all fail for this file alone.
    A warning is about the image when its code says so (:class:`esc_sr.errors.ImageWarning`)."""
    from .. import engine, images
    from ..errors import ImageWarning

    if job.error:
        return "failed", job.error, []
    target = job.target
    assert target is not None
    notes: list[tuple[bool, str]] = []
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
            if engine.is_out_of_memory(exc) and not is_user_error(exc):
                status, message = "failed", f"out of memory ({one_line(exc)})"
            else:
                status, message = "failed", one_line(exc)
        for record in caught:
            note = (issubclass(record.category, ImageWarning), printable(" ".join(str(record.message).split())))
            if note not in notes:
                notes.append(note)
    return status, message, notes


def _process(source: Path, target: Path, model, args: argparse.Namespace, *, outscale: float, device,
             progress: bool) -> tuple[str, str]:
    from .. import atomic, engine, images

    same_as_input = resolved(target) == resolved(source)
    if target.exists() and not args.overwrite:
        what = "is the input file" if same_as_input else "exists"
        return "skipped", f"{target}: skipped, output {what} (use --overwrite to replace it)"
    try:
        atomic.ensure_folder(target.parent)  # a part of the path that is a file: "... is a file, not a directory"
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
    message = printable(message)
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
            print(printable(f"  {name}: {reason}"), file=sys.stderr)
