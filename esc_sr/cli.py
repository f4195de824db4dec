"""The ``esc-sr`` command line: a dispatcher over subcommands.

    esc-sr upscale INPUT... -o OUT [-m MODEL] [--outscale S] [--tile N] ...
    esc-sr info MODEL
    esc-sr convert MODEL OUT.safetensors [--half]

Adding a subcommand (for other modules of the package, and plugins)
-------------------------------------------------------------------
A subcommand lives in its own module as one function ``add_<name>_parser(subparsers)`` that calls
``subparsers.add_parser(NAME, ...)``, adds its arguments and ``set_defaults(func=run)``, where
``run(args) -> int`` returns the exit code and simply raises on errors (the dispatcher turns any
exception into one line ``esc-sr NAME: error: ...``, or a traceback with ``--debug``). Then either

* add one line ``"module:add_<name>_parser"`` to :data:`SUBCOMMANDS` below, or
* call :func:`register_subcommand` with that ``"module:function"`` before :func:`main` runs.

Modules are imported only when the parser is built; a module that cannot be imported (e.g. an
optional dependency is missing) still shows up, and running it prints why it is unavailable.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "register_subcommand", "SUBCOMMANDS", "CliError"]

PROG = "esc-sr"

# Subcommand name -> "module:function" adding its parser (see the module docstring). Order = help order.
SUBCOMMANDS: dict[str, str] = {
    "upscale": "esc_sr.cli:add_upscale_parser",
    "info": "esc_sr.cli:add_info_parser",
    "convert": "esc_sr.cli:add_convert_parser",
    "models": "esc_sr.hub:add_models_parser",
    "demo": "esc_sr.demo:add_demo_parser",
    "export-onnx": "esc_sr.onnx_export:add_export_onnx_parser",
    "chainner": "esc_sr.chainner_hook:add_chainner_parser",
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def register_subcommand(name: str, target: str) -> None:
    """Register (or replace) subcommand ``name`` whose parser is added by ``target`` = ``"module:function"``."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:function', not {target!r}")
    SUBCOMMANDS[name] = target


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full ``esc-sr`` parser with every registered subcommand."""
    from esc_arch import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ESC super-resolution: upscale images, inspect and convert ESC checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, target in SUBCOMMANDS.items():
        _add_subcommand(subparsers, name, target)
    # --debug is accepted after the subcommand too (``esc-sr upscale ... --debug``).
    for sub in subparsers.choices.values():
        if not any("--debug" in action.option_strings for action in sub._actions):
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_subcommand(subparsers: Any, name: str, target: str) -> None:
    module_name, _, function_name = target.partition(":")
    try:
        add_parser = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:  # a broken or optional module must not take the whole CLI down
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        sub = subparsers.add_parser(name, help=f"(unavailable: {reason})", add_help=False)

        def unavailable(_args: argparse.Namespace, reason: str = reason) -> int:
            raise CliError(f"this command is unavailable in this installation ({reason})")

        sub.set_defaults(func=unavailable, accepts_any_arguments=True)
        return
    add_parser(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esc-sr`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = f"{PROG} {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        if not getattr(args, "debug", False) and not _is_expected(exc):
            print(f"{command}: (run with --debug for the traceback)", file=sys.stderr)
        return exc.code if isinstance(exc, CliError) else EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if _is_expected(exc) else f"{type(exc).__name__}: {text}"


def _is_expected(exc: BaseException) -> bool:
    """Errors whose message is already a complete sentence for the user."""
    from esc_arch import CheckpointError
    from .engine import EngineError
    from .images import ImageReadError, ImageWriteError

    expected: tuple[type, ...] = (CliError, CheckpointError, EngineError, ImageReadError, ImageWriteError)
    try:
        from .hub import HubError

        expected += (HubError,)
    except ImportError:
        pass
    return isinstance(exc, expected)


# ------------------------------------------------------------------------------------------- models


def load_cli_model(name: str, *, attention: str | None = None):
    """Load ``-m/--model``: ``default``, a checkpoint path, or an official name (via ``esc_sr.hub``)."""
    import esc_arch

    # A model that cannot be had is a usage error (exit 2), reported in one line.
    try:
        hub_errors: tuple[type[BaseException], ...] = ()
        source: Any = name
        if name != "default":
            try:
                from . import hub

                hub_errors = (hub.HubError,)
            except ImportError:
                hub = None
            if hub is not None:
                source = hub.resolve_model(name)
            elif not Path(name).expanduser().exists():
                raise CliError(f"model file not found: {name}")
            source = str(Path(source).expanduser())
            if Path(source).is_dir():
                raise CliError(f"{source}: is a directory, not a checkpoint file")
        model = esc_arch.load_model(source)
    except (esc_arch.CheckpointError, *hub_errors) as exc:
        raise CliError(_one_line(exc)) from exc
    if attention:
        esc_arch.set_attention_backend(model, attention)
    return model


def _attention_choices() -> list[str]:
    return ["sdpa", "flex", "naive"]


# ------------------------------------------------------------------------------------------ upscale


def add_upscale_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .engine import DEFAULT_OVERLAP

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
    parser.add_argument("--overlap", type=_non_negative_int, default=DEFAULT_OVERLAP, metavar="PX",
                        help=f"input pixels of context around each tile (default {DEFAULT_OVERLAP})")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="auto = fp16 on GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    parser.add_argument("--attention", choices=_attention_choices(), default=None,
                        help="attention backend (default: the model's)")
    parser.add_argument("--suffix", default=None,
                        help="appended to output file names (default: _x<outscale>, e.g. _x4); '' for none")
    parser.add_argument("--ext", choices=["auto", "png", "jpg", "webp", "tif", "bmp"], default="auto",
                        help="output format (default: same as the input where writable, else png)")
    parser.add_argument("--alpha", choices=["model", "resize"], default="model",
                        help="how to upscale alpha: through the model (default) or a Lanczos resize")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    parser.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=upscale_command)
    return parser


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


def _tile_arg(text: str) -> int | str | None:
    if text.lower() == "auto":
        return "auto"
    value = _non_negative_int(text)
    return None if value == 0 else value


@dataclass
class _Job:
    source: Path
    target: Path | None = None
    error: str | None = None


@dataclass
class _Summary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    from .images import READABLE_EXTENSIONS, TEMP_PREFIX

    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in READABLE_EXTENSIONS and not p.name.startswith((".", TEMP_PREFIX))
    )


def collect_inputs(patterns: Sequence[str], *, recursive: bool = False) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """Expand INPUT arguments into ``(file, folder it came from)`` pairs, plus ``(argument, reason)`` errors."""
    found: list[tuple[Path, Path | None]] = []
    errors: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, root: Path | None) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append((path, root))

    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            images = _images_in(path, recursive)
            if not images:
                errors.append((pattern, "folder contains no image files"))
            for image in images:
                add(image, path)
        elif path.exists():
            add(path, None)
        elif _has_glob(pattern):
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                errors.append((pattern, "no files match this pattern"))
            for file in files:
                add(file, None)
        else:
            errors.append((pattern, "no such file or directory"))
    return found, errors


def _default_suffix(outscale: float) -> str:
    return f"_x{outscale:g}"


def _output_extension(source: Path, choice: str) -> str:
    from .images import WRITABLE_EXTENSIONS

    if choice != "auto":
        return "." + choice
    ext = source.suffix.lower()
    return ext if ext in WRITABLE_EXTENSIONS else ".png"


def plan_outputs(
    inputs: list[tuple[Path, Path | None]], output: Path, *, suffix: str, ext: str, single_file: bool
) -> list[_Job]:
    """Decide every output path; flag collisions (two inputs, one output) and input==output."""
    jobs = []
    claimed: dict[Path, Path] = {}
    for source, root in inputs:
        if single_file:
            target = output
        else:
            relative = source.relative_to(root).parent if root is not None else Path()
            target = output / relative / f"{source.stem}{suffix}{_output_extension(source, ext)}"
        job = _Job(source, target)
        key = target.resolve()
        if key in claimed:
            job.error = f"output {target} would also be written for {claimed[key]}; rename one or use --suffix"
        else:
            claimed[key] = source
        jobs.append(job)
    return jobs


def upscale_command(args: argparse.Namespace) -> int:
    """Run ``esc-sr upscale``; returns 0 if every image was written or skipped, 1 if any failed."""
    from . import engine, images

    inputs, input_errors = collect_inputs(args.inputs, recursive=args.recursive)
    summary = _Summary(failed=list(input_errors))
    for argument, reason in input_errors:
        _report(f"{argument}: {reason}")
    if not inputs:
        raise CliError("no input images (see above)")

    model = load_cli_model(args.model, attention=args.attention)
    arbitrary = engine._is_arbitrary_scale(model)
    if arbitrary and args.outscale is None:
        raise CliError(f"{args.model}: the arbitrary-scale model needs --outscale (e.g. --outscale 3.5)")
    outscale = args.outscale if args.outscale is not None else float(model.scale)
    model, device, _dtype = engine.prepare_model(model, args.device, args.precision)

    output = Path(args.output).expanduser()
    single_file = (
        len(inputs) == 1 and len(args.inputs) == 1 and inputs[0][1] is None
        and output.suffix.lower() in images.WRITABLE_EXTENSIONS and not output.is_dir()
    )
    if single_file and args.ext != "auto" and output.suffix.lower() != "." + args.ext:
        raise CliError(f"--ext {args.ext} contradicts the output file name {output}")
    suffix = _default_suffix(outscale) if args.suffix is None else args.suffix
    jobs = plan_outputs(inputs, output, suffix=suffix, ext=args.ext, single_file=single_file)

    progress = not args.quiet and sys.stderr.isatty()
    bar = _progress_bar(jobs, enabled=progress and len(jobs) > 1)
    try:
        for job in bar:
            status, message = _upscale_one(job, model, args, outscale=outscale, device=device, progress=progress)
            if status == "written":
                summary.written.append(job.target)
            elif status == "skipped":
                summary.skipped.append(job.target)
                _report(message, bar)
            else:
                summary.failed.append((str(job.source), message))
                _report(f"{job.source}: {message}", bar)
    except KeyboardInterrupt:
        _report("interrupted; files written so far are complete", bar)
        _print_summary(summary)
        return EXIT_INTERRUPTED
    finally:
        if hasattr(bar, "close"):
            bar.close()
    _print_summary(summary)
    return EXIT_FAILED if summary.failed else EXIT_OK


def _upscale_one(job: _Job, model, args: argparse.Namespace, *, outscale: float, device, progress: bool) -> tuple[str, str]:
    """Process one image: ('written' | 'skipped' | 'failed', message). Never raises for a bad file."""
    from . import engine, images

    if job.error:
        return "failed", job.error
    target = job.target
    assert target is not None
    same_as_input = target.resolve() == job.source.resolve()
    if target.exists() and not args.overwrite:
        what = "is the input file" if same_as_input else "exists"
        return "skipped", f"{target}: skipped, output {what} (use --overwrite to replace it)"
    try:
        image = images.read_image(job.source)
        result = engine.upscale(
            model, image.pixels, outscale=outscale, tile=args.tile, overlap=args.overlap, device=device,
            precision=args.precision, alpha=args.alpha, progress=progress,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        images.write_image(target, result, quality=args.quality, icc_profile=image.icc_profile)
    except KeyboardInterrupt:
        raise
    except (images.ImageReadError, images.ImageWriteError) as exc:
        return "failed", exc.reason
    except Exception as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        return "failed", _one_line(exc)
    return "written", str(target)


def _progress_bar(jobs: list[_Job], *, enabled: bool):
    if not enabled:
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="images", unit="img", dynamic_ncols=True)


def _report(message: str, bar: Any = None) -> None:
    if bar is not None and hasattr(bar, "write"):
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _print_summary(summary: _Summary) -> None:
    parts = [f"{len(summary.written)} written"]
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} skipped (output exists)")
    parts.append(f"{len(summary.failed)} failed")
    print(f"{PROG} upscale: {', '.join(parts)}", file=sys.stderr)
    if summary.failed:
        print("failed:", file=sys.stderr)
        for name, reason in summary.failed:
            print(f"  {name}: {reason}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- info


def add_info_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="describe a model: variant, scale, hyperparameters, parameters, attention kernel",
        description="Load a checkpoint and describe it, including which attention kernel runs on this device.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file, official name or 'default'")
    parser.add_argument("--device", default="auto", help="device to report the attention kernel for (default auto)")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument("--attention", choices=_attention_choices(), default=None,
                        help="report for this attention backend instead of the model's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=info_command)
    return parser


def describe_model(model, *, device, dtype) -> dict[str, Any]:
    """The facts ``esc-sr info`` prints, as a dict."""
    import esc_arch

    return {
        "arch": model.arch_name,
        "preset": _matching_preset(model),
        "scale": "any (arbitrary-scale)" if model.arch_name == "ESCLTE" else model.scale,
        "window_size": model.window_size,
        "parameters": esc_arch.count_parameters(model),
        "hyperparameters": dict(model.hyperparameters),
        "attention_backend": model.attn_type,
        "attention_kernel": esc_arch.attention_kernel(model, device, dtype),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _matching_preset(model) -> str | None:
    """The preset whose hyperparameters the model has (ignoring the attention backend), if any."""
    import esc_arch

    def comparable(hyper: dict[str, Any]) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hyper.items() if k != "attn_type"}

    mine = comparable(model.hyperparameters)
    for name, build in esc_arch.PRESETS.items():
        try:
            candidate = build(model.scale) if model.arch_name != "ESCLTE" else build()
        except Exception:
            continue
        if candidate.arch_name == model.arch_name and comparable(candidate.hyperparameters) == mine:
            return name
    return None


def info_command(args: argparse.Namespace) -> int:
    import json

    from . import engine

    model = load_cli_model(args.model, attention=args.attention)
    device = engine.resolve_device(args.device)
    dtype = engine.resolve_precision(args.precision, device)
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


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert any supported checkpoint to .safetensors (optionally fp16)",
        description=(
            "Read a checkpoint in any supported format (official .pth, BasicSR, neosr, traiNNer-redux, "
            ".safetensors) and write a .safetensors file with the model's metadata, which loads "
            "without executing code. Weights are stored un-fused, as upstream stores them: "
            "esc_arch.fuse() is an in-memory inference cache that load_model rebuilds in milliseconds."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint file or official name")
    parser.add_argument("out", metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--half", action="store_true", help="store weights as fp16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=convert_command)
    return parser


def convert_command(args: argparse.Namespace) -> int:
    import esc_arch

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".safetensors":
        raise CliError(f"{out}: the output must be a .safetensors file")
    if out.exists() and not args.overwrite:
        raise CliError(f"{out}: exists (use --overwrite to replace it)")
    model = load_cli_model(args.model)
    source = Path(args.model).expanduser()
    if source.exists() and source.resolve() == out.resolve():
        raise CliError(f"{out}: is the input checkpoint; write to another file")
    esc_arch.save_model(model, out, half=args.half)
    size = out.stat().st_size
    print(
        f"wrote {out}: {model.arch_name} x{model.scale}, {esc_arch.count_parameters(model):,} parameters, "
        f"{'fp16' if args.half else 'fp32'}, {size / 1e6:.2f} MB"
    )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
