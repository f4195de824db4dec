"""Official ESC weights on demand: a registry of the upstream release and a download cache.

The official checkpoints are assets of the GitHub release ``1.0.0`` of ``dslisleedh/ESC``.
:func:`resolve_model` turns a registry name such as ``ESC_DIV2K_X4`` into a local file, downloading it
once into :func:`cache_dir` (``$ESC_SR_CACHE``, else ``$XDG_CACHE_HOME/esc-sr/weights``, else
``~/.cache/esc-sr/weights``); ``$ESC_SR_WEIGHTS_BASE_URL`` replaces the release URL prefix (a mirror, a
test server).

Downloads use :func:`torch.hub.download_url_to_file` (progress bar, SHA-256 check where the registry knows
the digest) inside :func:`esc_sr.atomic.atomic_write`, and the file must be a complete PyTorch checkpoint
before it gets its final name: the cache never holds a truncated checkpoint, and an interrupted download
starts over next time. Every failure is one line (:class:`HubError`) naming the URL and the path where the
file can be placed by hand.
"""

from __future__ import annotations

import difflib
import http.client
import os
import re
import socket
import sys
import threading
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

from torch.hub import download_url_to_file

from esc_arch.errors import ESCError

from .atomic import atomic_write

__all__ = [
    "RELEASE_BASE_URL", "CACHE_ENV", "BASE_URL_ENV", "ReleaseAsset", "ModelStatus", "REGISTRY",
    "HubError", "UnknownModelError", "DownloadError", "ChecksumError",
    "cache_dir", "base_url", "lookup", "close_matches", "is_registry_name", "list_models",
    "resolve_model", "download_model", "format_model_table",
]

RELEASE_BASE_URL = "https://github.com/dslisleedh/ESC/releases/download/1.0.0"
CACHE_ENV = "ESC_SR_CACHE"
BASE_URL_ENV = "ESC_SR_WEIGHTS_BASE_URL"
_DEFAULT_TIMEOUT_S = 30.0
# torch.hub connects without a timeout, so one is set as the process-wide socket default while a download
# runs; the lock keeps threads from interleaving that, and makes downloads in one process take turns.
_DOWNLOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReleaseAsset:
    """One checkpoint of the release: registry name (the file name without ``.pth``), upscaling factor,
    description, and the lowercase hex SHA-256 where it is known."""

    name: str
    scale: int
    description: str
    sha256: str | None = None

    @property
    def filename(self) -> str:
        """The asset's file name in the release and in the cache."""
        return f"{self.name}.pth"

    def url(self, base: str | None = None) -> str:
        """Download URL under ``base`` (default: :func:`base_url`)."""
        return f"{(base or base_url()).rstrip('/')}/{self.filename}"


def _family(prefix: str, description: str, suffix: str = "") -> list[ReleaseAsset]:
    return [ReleaseAsset(f"{prefix}_X{s}{suffix}", s, f"{description}, x{s}") for s in (2, 3, 4)]


# Checksums: only the two published for the Real-world models are known; the others are left unset
# rather than guessed (those downloads are still atomic and checked to be complete).
_ASSETS: list[ReleaseAsset] = [
    *_family("ESC_DIV2K", "ESC (base) trained on DIV2K"),
    *_family("ESC_light", "ESC-light trained on DIV2K"),
    *_family("ESC_FP", "ESC-FP (decomposed large kernel) trained on DIV2K"),
    *_family("ESC_DFLIP", "ESC (base) trained on DFLIP (DIV2K+Flickr2K+LSDIR+DiverSeg-IP)"),
    *_family("ESC_XL_DF2K", "ESC-XL trained on DF2K, fine-tuned", suffix="_FT"),
    ReleaseAsset("ESC_Real_X4_MSE", 4, "ESC-Real, real-world degradations, L1 stage (init of the GAN stage), x4",
                 "ba22ae75b5f77382b1046e68634f58a53fc7ff5ffa46714133bfba30811ad943"),
    ReleaseAsset("ESC_Real_X4_GAN", 4, "ESC-Real, real-world degradations, GAN stage, x4",
                 "d6932bd01e29c9335f5f678b0e9b31ede906a42244887ab8888b1d39a8667f2d"),
]

#: Registry name (as published, mixed case) -> asset.
REGISTRY: dict[str, ReleaseAsset] = {asset.name: asset for asset in _ASSETS}
_BY_LOWER_NAME: dict[str, ReleaseAsset] = {name.lower(): asset for name, asset in REGISTRY.items()}


class HubError(ESCError, RuntimeError):
    """Base class of the errors raised here; the message is one line meant for users."""


class UnknownModelError(HubError, LookupError):
    """The name is neither an existing file nor a registry name."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a key
        return str(self.args[0]) if self.args else ""


class DownloadError(HubError):
    """The file could not be downloaded (offline, HTTP error, interrupted transfer)."""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 differs from the registry's."""


class _IncompleteDownload(Exception):
    """What torch.hub saved is not a whole checkpoint (see :func:`_download`)."""


@dataclass(frozen=True)
class ModelStatus:
    """A registry entry together with its state in the local cache (see :func:`list_models`)."""

    asset: ReleaseAsset
    url: str
    path: Path
    cached: bool


def cache_dir() -> Path:
    """The folder downloaded weights live in (not created here): ``$ESC_SR_CACHE``, else the XDG cache."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "esc-sr" / "weights"


def base_url() -> str:
    """The URL prefix assets are downloaded from (``$ESC_SR_WEIGHTS_BASE_URL`` or the release)."""
    return os.environ.get(BASE_URL_ENV) or RELEASE_BASE_URL


def _normalise(name: str) -> str:
    name = name.strip().lower()
    return name[: -len(".pth")] if name.endswith(".pth") else name


def lookup(name: str) -> ReleaseAsset | None:
    """The registry asset for ``name`` (case-insensitive, a trailing ``.pth`` allowed), or None."""
    return _BY_LOWER_NAME.get(_normalise(name))


def is_registry_name(name: str) -> bool:
    """True when ``name`` names a registry asset."""
    return lookup(name) is not None


def close_matches(name: str, limit: int = 3) -> list[str]:
    """Registry names that look like ``name`` (for "did you mean" messages)."""
    matches = difflib.get_close_matches(_normalise(name), list(_BY_LOWER_NAME), n=limit, cutoff=0.5)
    return [_BY_LOWER_NAME[m].name for m in matches]


def list_models() -> list[ModelStatus]:
    """Every registry entry, in release order, with where it is (or would be) cached."""
    folder = cache_dir()
    return [ModelStatus(a, a.url(), folder / a.filename, (folder / a.filename).is_file()) for a in _ASSETS]


def resolve_model(
    name_or_path: str | os.PathLike[str], *, progress: bool | None = None, timeout: float = _DEFAULT_TIMEOUT_S
) -> Path:
    """Return a local checkpoint file for a path or an official registry name.

    An existing file is returned as is (``~`` expanded); a registry name such as ``"ESC_DIV2K_X4"``
    (case-insensitive, ``.pth`` optional) gives its file in :func:`cache_dir`, downloaded first if needed.
    ``progress``: a progress bar on stderr (default: when stderr is a terminal); ``timeout``: seconds for
    each network operation. Raises :class:`UnknownModelError` (not a file nor a registry name; close
    matches are listed), :class:`DownloadError` (the message names the URL and the cache path where the file
    can be placed by hand) or :class:`ChecksumError`.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    return download_model(str(name_or_path), progress=progress, timeout=timeout)


def download_model(name: str, *, progress: bool | None = None, timeout: float = _DEFAULT_TIMEOUT_S) -> Path:
    """Return the cached file of the registry model ``name``, downloading it first if needed.

    Unlike :func:`resolve_model`, only registry names are accepted (what ``esc-sr models --download``
    takes); arguments, return value and errors are otherwise those of :func:`resolve_model`.
    """
    asset = lookup(name)
    if asset is None:
        raise UnknownModelError(_unknown_message(name))
    target = cache_dir() / asset.filename
    if not target.is_file():
        _download(asset, asset.url(), target, progress=sys.stderr.isatty() if progress is None else progress,
                  timeout=timeout)
    return target


def _unknown_message(name: str) -> str:
    if any(sep in name for sep in ("/", "\\")) or re.search(r"\.\w+$", name):
        return f"model file not found: {name}"
    suggestions = close_matches(name)
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    return (
        f"unknown model name: {name}: not an existing file nor an official ESC release name; "
        f"{hint}run 'esc-sr models' for the list"
    )


def _download(asset: ReleaseAsset, url: str, target: Path, *, progress: bool, timeout: float) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the weights cache folder {target.parent}: {exc.strerror or exc}") from exc
    with _DOWNLOAD_LOCK:
        if target.is_file():  # another thread finished it while we waited
            return
        if progress:
            print(f"Downloading {url} to {target}", file=sys.stderr)
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            # Each download (one per process) has its own temporary file, renamed over the target when complete.
            with atomic_write(target) as temp:
                download_url_to_file(url, str(temp), hash_prefix=asset.sha256, progress=progress)
                # torch.hub does not compare what it got with Content-Length: when the server drops the connection
                # early, it saves the short file as if complete. torch.save writes a zip archive, whose directory is
                # its last bytes, so a cut one is not a zip file (nor is an HTML page served with status 200).
                if not zipfile.is_zipfile(temp):
                    raise _IncompleteDownload(f"connection closed early? got {temp.stat().st_size} bytes that "
                                              "are not a complete PyTorch checkpoint")
        except RuntimeError as exc:  # torch.hub: 'invalid hash value (expected "...", got "<digest>")'
            got = re.search(r'invalid hash value .*got "([0-9a-f]+)"', str(exc))
            if got is None:
                raise
            raise ChecksumError(
                f"checksum mismatch for {asset.name} downloaded from {url}: expected sha256 {asset.sha256}, "
                f"got {got.group(1)}; the download was discarded, nothing was cached at {target}"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, _IncompleteDownload) as exc:
            raise DownloadError(
                f"could not download {asset.name} from {url} ({_describe(exc)}); nothing was cached; "
                f"if you are offline, download {url} by other means and save it as {target}"
            ) from exc
        finally:
            socket.setdefaulttimeout(previous_timeout)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _IncompleteDownload):
        return str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def format_model_table() -> str:
    """The registry as a text table with cache state (what ``esc-sr models`` prints)."""
    statuses = list_models()
    width = max(len(s.asset.name) for s in statuses)
    lines = [
        f"Official ESC weights: {RELEASE_BASE_URL.rsplit('/download/', 1)[0]}/tag/1.0.0"
        + (f" (downloads from {base_url()})" if base_url() != RELEASE_BASE_URL else ""),
        f"Cache folder: {cache_dir()}  (set {CACHE_ENV} to move it)",
        "",
        f"{'NAME':<{width}}  SCALE  CACHED   SHA256  DESCRIPTION",
    ]
    for s in statuses:
        cached, checksum = "yes" if s.cached else "no", "known" if s.asset.sha256 else "-"
        lines.append(f"{s.asset.name:<{width}}  x{s.asset.scale:<4}  {cached:<7}  {checksum:<6}  {s.asset.description}")
    lines += ["", "Use one with: esc-sr upscale -m ESC_DIV2K_X4 INPUT -o OUTPUT  (downloaded once, then cached)"]
    return "\n".join(lines)
