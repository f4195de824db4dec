"""``esc-sr chainner install|uninstall``: put (or remove) ESC's lazy spandrel hook in a Python.

chaiNNer loads PyTorch models with ``spandrel.ModelLoader`` and imports no third-party packages, so
ESC checkpoints are "unsupported" there.  This installs two files into the target Python's
site-packages (normally chaiNNer's integrated Python):

* ``esc_sr_chainner_hook.py`` -- a copy of :mod:`esc_sr._chainner_startup` (standard library
  only; registers ESC when spandrel is imported), and
* ``esc_sr_chainner_hook.pth`` -- the line ``import esc_sr_chainner_hook``, which Python's
  ``site`` module executes at every start of that interpreter.

The ESC code itself comes from the ``esc-sr`` package, which must be installed into that same
Python (``PYTHON -m pip install esc-sr``); the installer checks that it is importable there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from esc_arch.atomic import write_text
from esc_arch.errors import ESCError

__all__ = [
    "HOOK_MODULE",
    "HookError",
    "HookLocation",
    "install_hook",
    "locate",
    "uninstall_hook",
]

HOOK_MODULE = "esc_sr_chainner_hook"
_MARKER = "esc-sr chainner hook"
_PTH_TEXT = f"# {_MARKER}: registers ESC with spandrel when spandrel is imported (esc-sr chainner uninstall removes it)\nimport {HOOK_MODULE}\n"
_HOOK_SOURCE = Path(__file__).with_name("_chainner_startup.py")


class HookError(ESCError, RuntimeError):
    """The hook cannot be installed or removed; the message says why in one line."""


@dataclass(frozen=True)
class HookLocation:
    """Where the hook goes for one Python interpreter."""

    python: str
    site_packages: Path
    esc_arch_importable: bool

    @property
    def module_file(self) -> Path:
        return self.site_packages / f"{HOOK_MODULE}.py"

    @property
    def pth_file(self) -> Path:
        return self.site_packages / f"{HOOK_MODULE}.pth"


# Run inside the target interpreter: its site-packages, and whether esc_arch can be found there
# (not counting the current folder, which `python -c` puts first on sys.path).  find_spec does
# not import the package (nor torch), so this is fast.
_PROBE = (
    "import sys; sys.path = [p for p in sys.path if p != ''];"
    "import json, importlib.util, sysconfig;"
    "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'],"
    " 'esc_arch': importlib.util.find_spec('esc_arch') is not None}))"
)


def locate(python: str | os.PathLike[str] | None = None) -> HookLocation:
    """Ask ``python`` (default: this interpreter) where its site-packages are."""
    executable = str(python) if python is not None else sys.executable
    try:
        # -I would hide the PYTHONPATH a user may rely on; -s keeps the user site out, as chaiNNer does.
        done = subprocess.run(
            [executable, "-s", "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
        )
    except FileNotFoundError:
        raise HookError(f"{executable}: no such Python executable") from None
    except PermissionError:
        raise HookError(f"{executable}: not executable") from None
    except subprocess.TimeoutExpired:
        raise HookError(f"{executable}: did not answer within 120 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise HookError(f"{executable}: is not a working Python ({last})")
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise HookError(f"{executable}: unexpected answer from the interpreter: {done.stdout[:200]!r}") from None
    return HookLocation(executable, Path(info["purelib"]), bool(info["esc_arch"]))


def _ours(path: Path) -> bool:
    try:
        return _MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def install_hook(python: str | os.PathLike[str] | None = None, *, require_esc_arch: bool = True) -> HookLocation:
    """Install the hook into ``python``'s site-packages (idempotent: an existing hook is refreshed).

    Raises :class:`HookError` when esc_arch is not importable there (unless ``require_esc_arch`` is
    False), when a file of the same name that is not ours is in the way, or when the folder is not
    writable.
    """
    where = locate(python)
    if require_esc_arch and not where.esc_arch_importable:
        raise HookError(
            f"esc-sr is not installed in {where.python}; install it there first "
            f"({where.python} -m pip install esc-sr), then run this again"
        )
    for path in (where.module_file, where.pth_file):
        if path.exists() and not _ours(path):
            raise HookError(f"{path}: exists and was not written by esc-sr; not replacing it")
    try:
        where.site_packages.mkdir(parents=True, exist_ok=True)
        # Module first, .pth last: a .pth that names a missing module would print an error at every start.
        # The temporary files end in .tmp: Python runs every *.pth in site-packages at start-up (hidden ones too,
        # on Python 3.11 at least), so a temporary .pth must never have that suffix.
        write_text(where.module_file, _HOOK_SOURCE.read_text(encoding="utf-8"), suffix=".tmp")
        _compile(where)
        write_text(where.pth_file, _PTH_TEXT, suffix=".tmp")
    except OSError as error:
        raise HookError(f"{where.site_packages}: cannot write the hook ({error.strerror or error})") from None
    return where


def _compile(where: HookLocation) -> None:
    """Byte-compile the hook with the target interpreter (its own .pyc magic number).

    Where PYTHONDONTWRITEBYTECODE is set, nothing would ever cache it, and compiling the source at
    every start costs milliseconds; a .pyc written now is still read.
    """
    subprocess.run(
        [where.python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)", str(where.module_file)],
        capture_output=True, timeout=120, check=False,
    )


def uninstall_hook(python: str | os.PathLike[str] | None = None) -> tuple[HookLocation, list[Path]]:
    """Remove the hook from ``python``'s site-packages; returns the files removed (none if absent)."""
    where = locate(python)
    removed: list[Path] = []
    # .pth first, so no interpreter start between the two deletions imports a missing module.
    for path in (where.pth_file, where.module_file):
        if not path.exists():
            continue
        if not _ours(path):
            raise HookError(f"{path}: was not written by esc-sr; not removing it")
        try:
            path.unlink()
        except OSError as error:
            raise HookError(f"{path}: cannot remove ({error.strerror or error})") from None
        removed.append(path)
    cache = where.site_packages / "__pycache__"
    for compiled in cache.glob(f"{HOOK_MODULE}.*.pyc") if cache.is_dir() else ():
        compiled.unlink(missing_ok=True)
    return where, removed
