"""``esc-sr chainner install|uninstall``: put (or remove) esc-sr and ESC's lazy spandrel hook in a Python.

chaiNNer loads PyTorch models with ``spandrel.ModelLoader`` and imports no third-party packages, so
ESC checkpoints are "unsupported" there.  :func:`install` does two things in the target Python
(normally chaiNNer's integrated Python), so that one command is all a user runs:

1. it installs **this same esc-sr** there -- the one running the command -- from a wheel of it
   (:mod:`esc_sr.distribution`: the wheel it was installed from, a wheel of its installed files, or a
   build of its source folder), with ``pip install --no-deps --no-index``: offline, and the target's
   torch, numpy and safetensors are not touched;
2. it installs the hook, two files in that Python's site-packages:

   * ``esc_sr_chainner_hook.py`` -- a copy of :mod:`esc_sr._chainner_startup` (standard library
     only; registers ESC when spandrel is imported), and
   * ``esc_sr_chainner_hook.pth`` -- the line ``import esc_sr_chainner_hook``, which Python's
     ``site`` module executes at every start of that interpreter;

and records what it did in ``esc_sr_chainner_hook.json`` beside them.  :func:`uninstall` reverses
both steps: the hook files, then esc-sr where that record says this command installed it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from esc_arch.errors import ESCError

from .atomic import write_text

__all__ = [
    "HOOK_MODULE",
    "HookError",
    "HookLocation",
    "InstallReport",
    "UninstallReport",
    "install",
    "install_hook",
    "locate",
    "uninstall",
    "uninstall_hook",
]

HOOK_MODULE = "esc_sr_chainner_hook"
_MARKER = "esc-sr chainner hook"
_PTH_TEXT = f"# {_MARKER}: registers ESC with spandrel when spandrel is imported (esc-sr chainner uninstall removes it)\nimport {HOOK_MODULE}\n"
_HOOK_SOURCE = Path(__file__).with_name("_chainner_startup.py")


class HookError(ESCError, RuntimeError):
    """The hook cannot be installed or removed; the message says why in one line."""


#: What is read of each output stream of a program run in the target Python (the probe, pip, the compile step):
#: its answers are a few hundred bytes, pip's quiet output a few lines. A program that writes more is stopped.
OUTPUT_LIMIT = 1 << 20


def _run(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, reading at most
    :data:`OUTPUT_LIMIT` bytes of each stream: a program that writes more (a "python" that floods its output) is
    killed and refused with a :class:`HookError` instead of filling this process's memory."""
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **kwargs) as proc:
        buffers = {"stdout": bytearray(), "stderr": bytearray()}
        flooded = threading.Event()

        def drain(stream, buffer: bytearray) -> None:
            while data := stream.read1(65536):
                if len(buffer) + len(data) > OUTPUT_LIMIT:
                    flooded.set()
                    proc.kill()
                    return
                buffer += data

        readers = [threading.Thread(target=drain, args=(proc.stdout, buffers["stdout"]), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, buffers["stderr"]), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            for reader in readers:
                reader.join(timeout=5)
    if flooded.is_set():
        raise HookError(f"{command[0]}: wrote more than {OUTPUT_LIMIT >> 20} MiB of output to "
                        f"`{' '.join(command[1:3])} ...`; stopped (not the Python interpreter it should be?)")
    text = {name: bytes(data).decode("utf-8", errors="replace") for name, data in buffers.items()}
    return subprocess.CompletedProcess(command, proc.returncode, text["stdout"], text["stderr"])


@dataclass(frozen=True)
class HookLocation:
    """Where the hook goes for one Python interpreter, and what that interpreter has."""

    python: str
    site_packages: Path
    esc_arch_importable: bool
    esc_sr_version: str | None = None  # the esc-sr distribution installed there, if any
    has_pip: bool = False
    missing: tuple[str, ...] = ()  # of esc_arch's own requirements (torch, safetensors, numpy)
    torch_version: str | None = None

    @property
    def module_file(self) -> Path:
        return self.site_packages / f"{HOOK_MODULE}.py"

    @property
    def pth_file(self) -> Path:
        return self.site_packages / f"{HOOK_MODULE}.pth"

    @property
    def state_file(self) -> Path:
        return self.site_packages / f"{HOOK_MODULE}.json"


# Run inside the target interpreter: its site-packages, and what can be found there (not counting
# the current folder, which `python -c` puts first on sys.path).  find_spec and importlib.metadata
# import nothing of the packages (nor torch), so this is fast.
_PROBE = (
    "import sys; sys.path = [p for p in sys.path if p != ''];"
    "import json, importlib.util, importlib.metadata as md, sysconfig\n"
    "def version(name):\n"
    "    try:\n        return md.version(name)\n"
    "    except md.PackageNotFoundError:\n        return None\n"
    "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'],"
    " 'esc_arch': importlib.util.find_spec('esc_arch') is not None,"
    " 'esc_sr': version('esc-sr'), 'pip': importlib.util.find_spec('pip') is not None,"
    " 'missing': [m for m in ('torch', 'safetensors', 'numpy') if importlib.util.find_spec(m) is None],"
    " 'torch': version('torch')}))"
)


def locate(python: str | os.PathLike[str] | None = None) -> HookLocation:
    """Ask ``python`` (default: this interpreter) where its site-packages are."""
    executable = str(python) if python is not None else sys.executable
    try:
        # -I would hide the PYTHONPATH a user may rely on; -s keeps the user site out, as chaiNNer does.
        done = _run([executable, "-s", "-c", _PROBE], timeout=120)
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
    return HookLocation(
        executable, Path(info["purelib"]), bool(info["esc_arch"]), info.get("esc_sr"), bool(info.get("pip")),
        tuple(info.get("missing", ())), info.get("torch"),
    )


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
            f"esc-sr is not installed in {where.python}; `esc-sr chainner install --python {where.python}` "
            "installs it there together with the hook"
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
    _run([where.python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], doraise=True)",
          str(where.module_file)], timeout=120)


def uninstall_hook(python: str | os.PathLike[str] | None = None) -> tuple[HookLocation, list[Path]]:
    """Remove the hook from ``python``'s site-packages; returns the files removed (none if absent)."""
    where = locate(python)
    return where, _remove_hook(where)


def _remove_hook(where: HookLocation) -> list[Path]:
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
    return removed


# -- esc-sr itself, then the hook ----------------------------------------------------------------


@dataclass
class InstallReport:
    """What :func:`install` did."""

    where: HookLocation  # as found after the installation
    package: str | None = None  # how esc-sr got there, e.g. "esc-sr 0.1.0 from its installed files"; None: not touched
    notes: list[str] = field(default_factory=list)


@dataclass
class UninstallReport:
    """What :func:`uninstall` did."""

    where: HookLocation
    removed: list[Path] = field(default_factory=list)  # hook files
    package: str | None = None  # "esc-sr 0.1.0" when it was uninstalled
    notes: list[str] = field(default_factory=list)


def _same_environment(where: HookLocation) -> bool:
    here = Path(sysconfig.get_paths()["purelib"])
    try:
        return here.resolve() == where.site_packages.resolve()
    except OSError:
        return False


def _pip(where: HookLocation, *arguments: str, cwd: str) -> None:
    """Run the target's pip, offline (no index), without the user site; raise HookError on failure."""
    if not where.has_pip:
        raise HookError(f"{where.python} has no pip (`{where.python} -m ensurepip` adds it)")
    done = _run([where.python, "-s", "-m", "pip", *arguments, "--disable-pip-version-check", "--no-input", "--quiet"],
                timeout=900, cwd=cwd, env={**os.environ, "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"})
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        raise HookError(f"{where.python} -m pip {arguments[0]} failed: {errors[-1].strip()}")


def _read_state(where: HookLocation) -> dict:
    try:
        state = json.loads(where.state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("marker") == _MARKER else {}


def _write_state(where: HookLocation, state: dict) -> None:
    try:
        write_text(where.state_file, json.dumps({"marker": _MARKER, **state}, indent=1) + "\n", suffix=".tmp")
    except OSError as error:
        raise HookError(f"{where.state_file}: cannot write ({error.strerror or error})") from None


def install(
    python: str | os.PathLike[str] | None = None, *, hook_only: bool = False, check: bool = True
) -> InstallReport:
    """Install this esc-sr into ``python`` (offline, ``--no-deps``), then the hook; idempotent.

    ``hook_only`` skips the package step (esc-sr must then be importable there unless ``check`` is
    False).  Where ``python`` is this interpreter's own environment, the package step is skipped too.
    Raises :class:`HookError` (or :class:`esc_sr.distribution.DistributionError`).
    """
    from . import distribution

    where = locate(python)
    state = _read_state(where)
    package = None
    notes: list[str] = []
    if not hook_only and not _same_environment(where):
        if not where.has_pip:
            raise HookError(f"{where.python} has no pip (`{where.python} -m ensurepip` adds it)")
        with tempfile.TemporaryDirectory(prefix="esc-sr-wheel-") as folder:
            wheel = distribution.wheel_of_this(folder)
            before, torch_before = where.esc_sr_version, where.torch_version
            _pip(where, "install", "--no-deps", "--no-index", "--force-reinstall", "--no-warn-script-location",
                 str(wheel.path), cwd=folder)
        where = locate(python)
        if where.esc_sr_version != wheel.origin.version or not where.esc_arch_importable:
            raise HookError(f"installing esc-sr {wheel.origin.version} into {where.python} did not make it importable there")
        if where.torch_version != torch_before:  # cannot happen with --no-deps; checked because it matters
            raise HookError(f"{where.python}: torch changed from {torch_before} to {where.torch_version} during the installation")
        package = f"esc-sr {wheel.origin.version} from {wheel.origin.describe()}"
        # The esc-sr there is now this command's, so uninstall removes it; one that was there before this
        # command first ran (installed by hand) is remembered, to say that it is not restored.
        state = {
            "esc_sr": wheel.origin.version,
            "installed_esc_sr": True,
            "replaced": state.get("replaced") if state else before,
        }
        if before is not None and before != wheel.origin.version:
            notes.append(f"replaced esc-sr {before} that was installed there")
    elif not state:
        state = {"esc_sr": where.esc_sr_version, "installed_esc_sr": False, "replaced": None}
    if where.missing:
        notes.append(
            f"{where.python} lacks {', '.join(where.missing)}: ESC models load once it has them "
            "(chaiNNer installs its PyTorch packages from its dependency manager)"
        )
    _write_state(where, state)
    where = install_hook(python, require_esc_arch=check)
    return InstallReport(where, package, notes)


def uninstall(python: str | os.PathLike[str] | None = None) -> UninstallReport:
    """Reverse :func:`install`: remove the hook, then esc-sr where :func:`install` installed it."""
    where = locate(python)
    state = _read_state(where)
    report = UninstallReport(where, _remove_hook(where))
    if state.get("installed_esc_sr") and where.esc_sr_version is not None and not _same_environment(where):
        with tempfile.TemporaryDirectory(prefix="esc-sr-uninstall-") as folder:
            _pip(where, "uninstall", "--yes", "esc-sr", cwd=folder)
        report.package = f"esc-sr {where.esc_sr_version}"
        if state.get("replaced"):
            report.notes.append(f"esc-sr {state['replaced']}, which install replaced, is not restored")
    elif where.esc_sr_version is not None:
        report.notes.append(
            f"esc-sr {where.esc_sr_version} in {where.python} was not installed by `esc-sr chainner install`; left in place"
        )
    if where.state_file.exists():
        try:
            where.state_file.unlink()
        except OSError as error:
            raise HookError(f"{where.state_file}: cannot remove ({error.strerror or error})") from None
    report.where = locate(python)
    return report
