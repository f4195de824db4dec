"""The batch of an ``esc-sr upscale`` run: which files, which outputs, and what happened to each.

:func:`collect_inputs` expands the INPUT arguments (files, folders, globs) into a list of files without duplicates;
:func:`plan_outputs` names every output and flags, on the whole list, the inputs that cannot be written (two inputs
that would write one output). Both are pure planning: nothing is read or written. A run on several processes
(:mod:`esc_sr.sharding`) plans once, on rank 0, before the list is split, so a collision between two files that
end up on different processes is still caught. :class:`Summary` is what a run reports at the end.

Only the standard library is imported at the top: :mod:`esc_sr.cli` imports this module, and ``esc-sr --help``
must not load torch.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["Job", "Summary", "collect_inputs", "plan_outputs", "resolved", "default_suffix", "bad_suffix"]


@dataclass
class Job:
    """One input file, the output it is written to, and (when it cannot be done at all) why not."""

    source: Path
    target: Path | None = None
    error: str | None = None


@dataclass
class Summary:
    """Outcomes of a run: outputs written, outputs skipped (they exist), and ``(name, reason)`` failures."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence[Summary], jobs: Sequence[Job]) -> Summary:
        """The summaries of the processes of one run as one; failures in the plan's order (as a single process
        lists them), failures that are not a job (an INPUT argument that matched nothing) first."""
        order = {str(job.source): index for index, job in enumerate(jobs)}
        merged = cls()
        for part in parts:
            merged.written += part.written
            merged.skipped += part.skipped
            merged.failed += part.failed
        merged.failed.sort(key=lambda failure: order.get(failure[0], -1))  # stable: input errors keep their order
        return merged


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
        key = resolved(path)
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
            errors.append((pattern, _missing_reason(path)))
    return found, errors


def resolved(path: Path) -> Path:
    """``path.resolve()``, or the absolute path when a symlink loop stops it (RuntimeError before Python 3.13)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _missing_reason(path: Path) -> str:
    """Why ``path`` (neither a folder nor an existing file) cannot be read: a dangling link or a symlink loop is
    not 'no such file'."""
    try:
        os.stat(path)
    except OSError as exc:
        from esc_arch.errors import os_error_reason

        reason = os_error_reason(exc)
        return "no such file or directory" if reason == "no such file" and not path.is_symlink() else (
            "a symbolic link to nothing (dangling)" if reason == "no such file" else reason)
    return "no such file or directory"


def default_suffix(outscale: float) -> str:
    """The default ``--suffix``: ``_x4``, ``_x3.5``."""
    return f"_x{outscale:g}"


def bad_suffix(suffix: str) -> str | None:
    """Why ``--suffix`` cannot be part of a file name, or None: it is appended to a name, never a path."""
    separators = [sep for sep in ("/", os.sep, os.altsep) if sep]
    if any(sep in suffix for sep in separators):
        return "contains a path separator; the suffix is appended to file names and cannot lead elsewhere"
    if "\0" in suffix:
        return "contains a NUL character"
    return None


def _output_extension(source: Path, choice: str) -> str:
    from .images import WRITABLE_EXTENSIONS

    if choice != "auto":
        return "." + choice
    ext = source.suffix.lower()
    return ext if ext in WRITABLE_EXTENSIONS else ".png"


def plan_outputs(
    inputs: list[tuple[Path, Path | None]], output: Path, *, suffix: str, ext: str, single_file: bool
) -> list[Job]:
    """Decide every output path; flag collisions (two inputs, one output) and input==output."""
    jobs = []
    claimed: dict[Path, Path] = {}
    for source, root in inputs:
        if single_file:
            target = output
        else:
            relative = source.relative_to(root).parent if root is not None else Path()
            target = output / relative / f"{source.stem}{suffix}{_output_extension(source, ext)}"
        job = Job(source, target)
        key = resolved(target)
        if key in claimed:
            job.error = f"output {target} would also be written for {claimed[key]}; rename one or use --suffix"
        else:
            claimed[key] = source
        jobs.append(job)
    return jobs
