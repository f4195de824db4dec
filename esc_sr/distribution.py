"""The running esc-sr as a wheel, offline: what ``esc-sr chainner install`` puts into another Python.

How this esc-sr was installed decides where the wheel comes from (``importlib.metadata`` and the
``direct_url.json`` pip records, PEP 610):

* **from a wheel file** that still exists (and matches its recorded hash): that file;
* **from an index, an sdist or a folder** (a regular install): a wheel is assembled from the installed
  files themselves, as listed in the installation's ``RECORD`` (the ``.dist-info`` metadata included;
  scripts are left out, the target's pip writes its own from ``entry_points.txt``);
* **editable** (``pip install -e``), or not installed at all (run from a checkout): the source folder is
  copied (its top-level packages and the build files at its root: ``pyproject.toml``, readme, licence ...) and built with this Python's own build backend
  (``pip wheel --no-build-isolation --no-index``), so nothing is downloaded.

Every route works without a network.  The wheel is pure Python (``py3-none-any``) and is installed
with ``--no-deps``, so the target's torch, numpy and safetensors are left exactly as they are.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from esc_arch.errors import ESCError

__all__ = ["DIST_NAME", "DistributionError", "Origin", "WheelOfThis", "origin", "wheel_of_this"]

DIST_NAME = "esc-sr"
#: Files of an installed ``.dist-info`` that describe that installation, not the package.
_INSTALLATION_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
#: Files at a source folder's root that a build of it may read.
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README*", "LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*")


class DistributionError(ESCError, RuntimeError):
    """The running esc-sr cannot be turned into a wheel; the message says why in one line."""


@dataclass(frozen=True)
class Origin:
    """How the running esc-sr was installed."""

    kind: str  # 'wheel', 'installed' (index / sdist / folder), 'editable', 'source' (not installed)
    version: str
    source: Path | None = None  # the wheel file (kind 'wheel') or the source folder ('editable', 'source')
    distribution: importlib.metadata.Distribution | None = None

    def describe(self) -> str:
        if self.kind == "wheel":
            return f"the wheel it was installed from ({self.source})"
        if self.kind == "installed":
            return "its installed files"
        return f"its source folder {self.source}" + (" (editable install)" if self.kind == "editable" else "")


@dataclass(frozen=True)
class WheelOfThis:
    path: Path
    origin: Origin


def _running_package_dir() -> Path:
    import esc_sr

    return Path(esc_sr.__file__).resolve().parent


def _url_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        return None
    return Path(url2pathname(unquote(parsed.path)))


def _direct_url(dist: importlib.metadata.Distribution) -> dict:
    text = dist.read_text("direct_url.json")
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def _hash_matches(path: Path, archive_info: dict) -> bool:
    hashes = dict(archive_info.get("hashes") or {})
    if not hashes and "=" in str(archive_info.get("hash", "")):
        name, _, value = archive_info["hash"].partition("=")
        hashes[name] = value
    for name, value in hashes.items():
        if name in hashlib.algorithms_available:
            digest = hashlib.new(name)
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest() == value
    return True  # nothing to check against


def origin() -> Origin:
    """Find out how the running esc-sr was installed (see the module docstring)."""
    here = _running_package_dir()
    # Installations have a RECORD (.dist-info); an .egg-info beside a checkout on sys.path has none.
    for dist in importlib.metadata.distributions(name=DIST_NAME):
        if dist.read_text("RECORD") is None:
            continue
        info = _direct_url(dist)
        folder = _url_path(info.get("url", "")) if "dir_info" in info else None
        if info.get("dir_info", {}).get("editable"):
            if folder is not None and (folder / "esc_sr").resolve() == here:
                return Origin("editable", dist.version, folder, dist)
            continue
        if Path(str(dist.locate_file("esc_sr/__init__.py"))).resolve().parent != here:
            continue  # another installation than the one running
        archive = _url_path(info.get("url", "")) if "archive_info" in info else None
        if archive is not None and archive.suffix == ".whl" and archive.is_file() and _hash_matches(archive, info["archive_info"]):
            return Origin("wheel", dist.version, archive, dist)
        return Origin("installed", dist.version, None, dist)
    # Not installed, or the installed esc-sr is not the one running: the checkout this code comes from.
    folder = here.parent
    if not (folder / "pyproject.toml").is_file():
        raise DistributionError(f"esc-sr at {here} is neither an installed distribution nor a source checkout")
    from esc_arch import __version__

    return Origin("source", __version__, folder, None)


def _wheel_name(dist_info: str, tag: str) -> str:
    stem = dist_info[: -len(".dist-info")]
    return f"{stem}-{tag}.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def _wheel_from_installed_files(dist: importlib.metadata.Distribution, out_dir: Path) -> Path:
    """Assemble a wheel from the files a regular installation's RECORD lists."""
    files = [f for f in (dist.files or []) if f.parts and f.parts[0] != ".."]
    dist_infos = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    if len(dist_infos) != 1:
        raise DistributionError(f"esc-sr {dist.version}: its installation lists no single .dist-info folder (RECORD)")
    (dist_info,) = dist_infos
    entries: list[tuple[str, Path]] = []
    for f in files:
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        if f.parts[0] == dist_info and f.name in _INSTALLATION_ONLY:
            continue
        location = Path(str(f.locate()))
        if not location.is_file():
            raise DistributionError(f"esc-sr {dist.version} is incompletely installed ({location} is missing); reinstall it")
        entries.append((f.as_posix(), location))
    wheel_text = dist.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag:\s*(\S+)", wheel_text, flags=re.M)
    if not wheel_text or not tags:
        wheel_text = "Wheel-Version: 1.0\nGenerator: esc-sr\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        tags = ["py3-none-any"]
        entries = [e for e in entries if e[0] != f"{dist_info}/WHEEL"]
        extra = [(f"{dist_info}/WHEEL", wheel_text.encode("utf-8"))]
    else:
        extra = []
    out = out_dir / _wheel_name(dist_info, tags[0])
    record: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, location in sorted(entries):
            data = location.read_bytes()
            wheel.writestr(name, data)
            record.append(f"{name},{_record_hash(data)},{len(data)}")
        for name, data in extra:
            wheel.writestr(name, data)
            record.append(f"{name},{_record_hash(data)},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return out


def _top_level_packages(source: Path, dist: importlib.metadata.Distribution | None) -> list[str]:
    names = (dist.read_text("top_level.txt") or "").split() if dist is not None else []
    if not names:  # not installed: the packages beside esc_sr that pyproject's package list names
        text = (source / "pyproject.toml").read_text(encoding="utf-8")
        names = [n for n in ("esc_arch", "esc_sr", "basicsr_plugin", "comfyui_nodes") if f'"{n}' in text]
    return [n for n in names if (source / n).is_dir() or (source / f"{n}.py").is_file()]


def _wheel_from_source(origin_: Origin, out_dir: Path) -> Path:
    """Copy the source folder's packages and root files, then build them with this Python, offline."""
    source = origin_.source
    assert source is not None
    try:
        import setuptools  # noqa: F401  (the build backend pyproject.toml names)
    except ImportError:
        raise DistributionError(
            f"cannot build esc-sr from {source} offline: setuptools is not installed in {sys.executable} "
            f"({sys.executable} -m pip install setuptools, or install esc-sr from a wheel)"
        ) from None
    staging = out_dir / "source"
    staging.mkdir()
    for item in source.iterdir():  # what a build reads at the root (not, say, checkpoints lying there)
        if item.is_file() and any(fnmatch.fnmatch(item.name, pattern) for pattern in _BUILD_FILES):
            shutil.copy2(item, staging / item.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", ".esc-sr-tmp-*")
    for name in _top_level_packages(source, origin_.distribution):
        if (source / name).is_dir():
            shutil.copytree(source / name, staging / name, ignore=ignore)
        else:
            shutil.copy2(source / f"{name}.py", staging / f"{name}.py")
    wheels = out_dir / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--no-input", "--quiet", "--wheel-dir", str(wheels), str(staging)],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    built = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if done.returncode != 0 or len(built) != 1:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistributionError(f"building a wheel of {source} failed ({last})")
    shutil.rmtree(staging, ignore_errors=True)
    return built[0]


def wheel_of_this(out_dir: str | os.PathLike[str]) -> WheelOfThis:
    """A wheel of the running esc-sr, in ``out_dir`` (or the original wheel file, where it still exists)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = origin()
    if found.kind == "wheel":
        path = found.source
    elif found.kind == "installed":
        path = _wheel_from_installed_files(found.distribution, out_dir)
    else:
        path = _wheel_from_source(found, out_dir)
    return WheelOfThis(Path(path), found)
