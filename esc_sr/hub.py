"""Official ESC weights on demand: a registry of the upstream release and a download cache.

The official checkpoints are published as assets of the GitHub release ``1.0.0`` of
``dslisleedh/ESC``. :func:`resolve_model` turns a registry name such as ``ESC_DIV2K_X4``
into a local file, downloading it once into a cache folder:

* **cache folder**: ``$ESC_SR_CACHE`` if set, else ``$XDG_CACHE_HOME/esc-sr/weights``,
  else ``~/.cache/esc-sr/weights``;
* **resumable**: bytes go to ``<name>.pth.part``; an interrupted download continues from
  where it stopped with an HTTP ``Range`` request;
* **verified**: the SHA-256 is checked where the registry knows it (a mismatch deletes
  the partial file and raises :class:`ChecksumError`);
* **atomic**: the final file appears only by renaming the verified ``.part`` file, so the
  cache never holds a truncated checkpoint under the final name;
* **offline-friendly**: any network failure raises one :class:`DownloadError` that names
  the URL and the exact path where the file can be placed by hand.

``$ESC_SR_WEIGHTS_BASE_URL`` replaces the release URL prefix (a mirror, or a local test
server). Only the Python standard library is used for networking.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from esc_arch.errors import ESCError

__all__ = [
    "RELEASE_BASE_URL",
    "CACHE_ENV",
    "BASE_URL_ENV",
    "ReleaseAsset",
    "ModelStatus",
    "REGISTRY",
    "HubError",
    "UnknownModelError",
    "DownloadError",
    "ChecksumError",
    "cache_dir",
    "base_url",
    "lookup",
    "close_matches",
    "is_registry_name",
    "list_models",
    "resolve_model",
    "download_model",
    "format_model_table",
]

RELEASE_BASE_URL = "https://github.com/dslisleedh/ESC/releases/download/1.0.0"
CACHE_ENV = "ESC_SR_CACHE"
BASE_URL_ENV = "ESC_SR_WEIGHTS_BASE_URL"

_CHUNK_BYTES = 1 << 20
_DEFAULT_TIMEOUT_S = 30.0
_USER_AGENT = "esc-sr-hub (+https://github.com/dslisleedh/ESC)"


@dataclass(frozen=True)
class ReleaseAsset:
    """One checkpoint of the official release.

    Attributes:
        name: the registry name (the asset's file name without ``.pth``).
        scale: the model's upscaling factor.
        description: what the model is and what it was trained on.
        sha256: lowercase hex digest of the file where it is known, else ``None``.
    """

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


# Checksums: only the two published for the Real-world models are known. The others are
# left unset rather than guessed; those downloads are still atomic and size-checked.
_ASSETS: list[ReleaseAsset] = [
    *_family("ESC_DIV2K", "ESC (base) trained on DIV2K"),
    *_family("ESC_light", "ESC-light trained on DIV2K"),
    *_family("ESC_FP", "ESC-FP (decomposed large kernel) trained on DIV2K"),
    *_family("ESC_DFLIP", "ESC (base) trained on DFLIP (DIV2K+Flickr2K+LSDIR+DiverSeg-IP)"),
    *_family("ESC_XL_DF2K", "ESC-XL trained on DF2K, fine-tuned", suffix="_FT"),
    ReleaseAsset(
        "ESC_Real_X4_MSE",
        4,
        "ESC-Real, real-world degradations, L1 stage (init of the GAN stage), x4",
        sha256="ba22ae75b5f77382b1046e68634f58a53fc7ff5ffa46714133bfba30811ad943",
    ),
    ReleaseAsset(
        "ESC_Real_X4_GAN",
        4,
        "ESC-Real, real-world degradations, GAN stage, x4",
        sha256="d6932bd01e29c9335f5f678b0e9b31ede906a42244887ab8888b1d39a8667f2d",
    ),
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


class _TransferError(Exception):
    """A transfer that went wrong in a way urllib does not report (short body, bad range)."""


@dataclass(frozen=True)
class ModelStatus:
    """A registry entry together with its state in the local cache (see :func:`list_models`)."""

    asset: ReleaseAsset
    url: str
    path: Path
    cached: bool
    partial_bytes: int


def cache_dir() -> Path:
    """The folder downloaded weights live in (not created here).

    ``$ESC_SR_CACHE`` wins; otherwise the XDG cache convention is followed.
    """
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
    name = name.strip()
    if name.lower().endswith(".pth"):
        name = name[: -len(".pth")]
    return name.lower()


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
    statuses = []
    for asset in _ASSETS:
        path = folder / asset.filename
        part = _part_path(path)
        statuses.append(
            ModelStatus(
                asset=asset,
                url=asset.url(),
                path=path,
                cached=path.is_file(),
                partial_bytes=part.stat().st_size if part.is_file() else 0,
            )
        )
    return statuses


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    progress: bool | None = None,
    timeout: float = _DEFAULT_TIMEOUT_S,
) -> Path:
    """Return a local checkpoint file for a path or an official registry name.

    Args:
        name_or_path: an existing file (returned as is, ``~`` expanded), or a registry name such as
            ``"ESC_DIV2K_X4"`` (case-insensitive; ``.pth`` optional).
        progress: show a download progress bar (tqdm) on stderr; default: when stderr is
            a terminal.
        timeout: socket timeout in seconds for each network operation.

    Returns:
        The path of the file; for registry names, the verified file in :func:`cache_dir`.

    Raises:
        UnknownModelError: not a file and not a registry name (close matches are listed).
        DownloadError: the download failed; the message names the URL and the cache path
            where the file can be placed by hand.
        ChecksumError: the downloaded bytes do not match the known SHA-256.
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
    if target.is_file():
        return target

    if progress is None:
        progress = sys.stderr.isatty()
    _download(asset, asset.url(), target, progress=progress, timeout=timeout)
    return target


def _unknown_message(name: str) -> str:
    looks_like_path = any(sep in name for sep in ("/", "\\")) or bool(re.search(r"\.\w+$", name))
    if looks_like_path:
        return f"model file not found: {name}"
    suggestions = close_matches(name)
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    return (
        f"unknown model name: {name}: not an existing file nor an official ESC release name; "
        f"{hint}run 'esc-sr models' for the list"
    )


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _manual_hint(url: str, target: Path) -> str:
    return f"download {url} by other means and save it as {target}"


@contextlib.contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    """Serialise concurrent downloads of one file (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent downloads of one file are unlikely
        yield
        return
    lock_path = target.with_name(target.name + ".lock")
    try:
        lock_file = open(lock_path, "a+b")
    except OSError as exc:
        raise DownloadError(f"cannot write to the weights cache folder {target.parent}: {exc.strerror or exc}") from exc
    with lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _download(asset: ReleaseAsset, url: str, target: Path, *, progress: bool, timeout: float) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the weights cache folder {target.parent}: {exc.strerror or exc}") from exc

    with _exclusive_lock(target):
        if target.is_file():  # another process finished it while we waited for the lock
            return
        part = _part_path(target)
        try:
            _fetch_into(url, part, progress=progress, timeout=timeout, label=asset.filename)
        except (urllib.error.URLError, http.client.HTTPException, OSError, _TransferError) as exc:
            raise DownloadError(
                f"could not download {asset.name} from {url} ({_describe(exc)}); "
                f"{'the partial file is kept and the next attempt resumes; ' if part.is_file() else ''}"
                f"if you are offline, {_manual_hint(url, target)}"
            ) from exc

        if asset.sha256 is not None:
            actual = _sha256_of(part)
            if actual != asset.sha256:
                part.unlink(missing_ok=True)
                raise ChecksumError(
                    f"checksum mismatch for {asset.name} downloaded from {url}: expected sha256 "
                    f"{asset.sha256}, got {actual}; the download was discarded, nothing was cached at {target}"
                )
        os.replace(part, target)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _TransferError):
        return str(exc)
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIABLE_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def _fetch_into(url: str, part: Path, *, progress: bool, timeout: float, label: str) -> None:
    """Download ``url`` into ``part``, resuming from its current size; fsync when complete.

    Raises an OSError subclass (or urllib/http.client errors) on failure; the bytes written
    so far stay in ``part`` so the next call resumes.
    """
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The server has nothing past `offset`: the part is complete if it holds
            # exactly the whole file; otherwise it is stale and we start over.
            match = _UNSATISFIABLE_RANGE.match(exc.headers.get("Content-Range", ""))
            exc.close()
            if match and int(match.group(1)) == offset:
                return
            part.unlink()
            return _fetch_into(url, part, progress=progress, timeout=timeout, label=label)
        raise

    with response:
        if offset and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise _TransferError("the server sent an unexpected Content-Range for a resumed download")
            total = None if match.group(3) == "*" else int(match.group(3))
            mode = "ab"
        else:
            # A plain 200: the server ignored the Range header, so the partial file is
            # useless and the body is the whole file.
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"

        with open(part, mode) as sink:
            _copy_with_progress(response, sink, offset, total, progress=progress, label=label)
            sink.flush()
            os.fsync(sink.fileno())

    size = part.stat().st_size
    if total is not None and size != total:
        raise _TransferError(f"connection closed after {size} of {total} bytes")
    if size == 0:
        raise _TransferError("the server sent an empty file")


def _copy_with_progress(
    source: IO[bytes], sink: IO[bytes], offset: int, total: int | None, *, progress: bool, label: str
) -> None:
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the [cli] extra; without it, download silently
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                       file=sys.stderr, leave=False)
    try:
        while chunk := source.read(_CHUNK_BYTES):
            sink.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- text


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
    for status in statuses:
        if status.cached:
            state = "yes"
        elif status.partial_bytes:
            state = "partial"
        else:
            state = "no"
        checksum = "known" if status.asset.sha256 else "-"
        lines.append(
            f"{status.asset.name:<{width}}  x{status.asset.scale:<4}  {state:<7}  {checksum:<6}  {status.asset.description}"
        )
    lines += ["", "Use one with: esc-sr upscale -m ESC_DIV2K_X4 INPUT -o OUTPUT  (downloaded once, then cached)"]
    return "\n".join(lines)
