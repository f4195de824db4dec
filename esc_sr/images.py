"""Image files as users have them: read into numpy, write back atomically, resize with chainner-ext.

Reading (:func:`read_image`) returns an :class:`Image` whose ``pixels`` are a numpy array in one of
these layouts, so the rest of the code never has to know about file formats:

* ``H x W``          grayscale
* ``H x W x 2``      grayscale + alpha
* ``H x W x 3``      RGB (never BGR)
* ``H x W x 4``      RGBA (straight, not premultiplied, alpha)

and one of these dtypes: ``uint8`` (8-bit files), ``uint16`` (16-bit PNG/TIFF, which stay 16-bit on
output) or ``float32`` (floating-point TIFF / Pillow mode ``F``).

What is normalised on the way in:

* EXIF orientation is applied (a portrait photo from a phone comes out upright), for 8- and 16-bit;
* palette images become RGB, or RGBA when the palette has transparency;
* CMYK (and YCbCr / LAB / HSV) become RGB through Pillow's conversion;
* 1-bit images become 8-bit grayscale; premultiplied modes are un-premultiplied.

Pillow decodes everything except 16-bit *colour* PNG/TIFF (Pillow would truncate those to 8 bits),
which OpenCV decodes instead. Writing uses OpenCV for PNG/TIFF (8/16-bit, 1-4 channels) and Pillow
for JPEG/WebP/BMP. Every write goes through :func:`esc_sr.atomic.atomic_write` (a temporary file
in the destination folder, renamed over the destination only once complete, with the permissions
the umask gives): an interrupted run leaves either no file or the previous file, never a truncated one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from esc_arch.errors import ESCError, os_error_reason
from esc_arch.inputs import UnusableFile, open_regular_file

from . import atomic
from .samples import _to_uint8, array_to_pil, from_float, pil_to_array, resize, to_float  # noqa: F401 (API)

__all__ = [
    "Image",
    "ImageInfo",
    "ImageReadError",
    "ImageWriteError",
    "READABLE_EXTENSIONS",
    "WRITABLE_EXTENSIONS",
    "read_image",
    "probe_image",
    "write_image",
    "encode_image",
    "write_bytes_atomic",
    "pil_to_array",
    "array_to_pil",
    "to_float",
    "from_float",
    "resize",
]

PathLike = Union[str, "os.PathLike[str]"]

# Extensions a folder scan picks up. Explicitly named files are tried whatever their extension.
READABLE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".tga", ".ppm", ".pgm", ".pnm"}
)
WRITABLE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})

_EXIF_ORIENTATION_TAG = 0x0112
# Prefix of the temporary files that atomic writes create next to their destination.
TEMP_PREFIX = atomic.TEMP_PREFIX


class ImageReadError(ESCError, ValueError):
    """An input file could not be decoded. ``str()`` is one line naming the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ImageWriteError(ESCError, ValueError):
    """An output could not be encoded or written. ``str()`` names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Image:
    """Decoded pixels plus what is needed to write a faithful output.

    Attributes:
        pixels: ``HxW``, ``HxWx2``, ``HxWx3`` or ``HxWx4`` array (see module docstring).
        format: the decoder's name for the source format (``"PNG"``, ``"JPEG"``, ...).
        icc_profile: the embedded colour profile, kept only when it still describes ``pixels``
            (RGB/gray sources; dropped for CMYK, whose profile no longer applies after conversion).
    """

    pixels: np.ndarray
    format: str
    icc_profile: bytes | None = None

    @property
    def has_alpha(self) -> bool:
        return self.pixels.ndim == 3 and self.pixels.shape[2] in (2, 4)

    @property
    def bit_depth(self) -> int:
        return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(self.pixels.dtype, 32)


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header declares, read without decoding its pixels (:func:`probe_image`).

    Attributes:
        width, height: the stored size (before any EXIF rotation).
        channels: channels of the array :func:`read_image` returns (1-4).
        bytes_per_sample: 1 (8-bit), 2 (16-bit) or 4 (float) in that array.
        format: Pillow's name for the format.
        frames: frames in the file (more than one: an animation or a multi-page file).
        decode_bytes: the memory decoding it takes at its peak (estimate, from the size and mode).
    """

    width: int
    height: int
    channels: int
    bytes_per_sample: int
    format: str
    frames: int
    decode_bytes: int


_MemorySpec = Union[str, int, None]


def _memory_limit(max_memory: _MemorySpec) -> tuple[int | None, str]:
    from .memory import memory_limit as engine_limit

    return engine_limit(max_memory)


def probe_image(path: PathLike) -> ImageInfo | None:
    """The header of an image file (:class:`ImageInfo`), read without decoding its pixels; None for a format only
    OpenCV knows (its header cannot be read on its own).

    Raises:
        ImageReadError: not a regular file, unreadable, empty, or a header Pillow cannot parse.
    """
    path = Path(path)
    handle, _size = _open(path)
    with handle:
        try:
            head = handle.read(32)
            handle.seek(0)
        except OSError as exc:
            raise ImageReadError(path, f"cannot read file ({os_error_reason(exc)})") from None
        pil = _open_pil(path, handle)
        if pil is None:
            return None
        with pil:
            return _info(pil, head)


def read_image(path: PathLike, *, max_memory: _MemorySpec = "auto") -> Image:
    """Decode an image file into an :class:`Image` (see the module docstring for the layouts).

    Only a regular file is read. Its declared size is checked before decoding: an image whose decoding needs
    more than ``max_memory`` (``'auto'``: the RAM available now; a number of bytes; None: no check) is refused.
    A file with several frames (an animated GIF, PNG or WebP, a multi-page TIFF) is refused rather than reduced
    to its first frame.

    Raises:
        ImageReadError: missing, empty, truncated, corrupt, too large, animated or unsupported file (one line).
    """
    path = Path(path)
    limit, limit_text = _memory_limit(max_memory)
    handle, size = _open(path)
    with handle:
        if limit is not None and size > limit:
            raise ImageReadError(path, f"the file is {_bytes(size)}, above {_bytes(limit)} ({limit_text}; "
                                       "--max-memory, or max_memory=..., raises the limit)")
        try:
            data = handle.read()
        except OSError as exc:
            raise ImageReadError(path, f"cannot read file ({os_error_reason(exc)})") from None
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    return _decode(path, data, limit, limit_text)


def _open(path: Path):
    try:
        return open_regular_file(path)
    except UnusableFile as exc:
        raise ImageReadError(path, str(exc)) from None


def _bytes(nbytes: float) -> str:
    from .memory import format_bytes

    return format_bytes(nbytes)


def _open_pil(path: Path, stream):
    """Pillow's lazy image for ``stream`` (header parsed, pixels not decoded), or None if Pillow does not know it."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    # Pillow refuses images above ~179 megapixels as "decompression bombs"; the size is checked here instead,
    # against the memory the job needs, so lift Pillow's fixed limit while the header is read.
    limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, None
    try:
        return PILImage.open(stream)
    except UnidentifiedImageError:
        return None
    except Exception as exc:  # Pillow raises assorted errors for damaged headers
        raise ImageReadError(path, f"corrupt image header ({_short(exc)})") from None
    finally:
        PILImage.MAX_IMAGE_PIXELS = limit


# Bands of the array read_image returns, per Pillow mode, and bytes per band of Pillow's own storage.
_OUT_CHANNELS = {"1": 1, "L": 1, "I": 1, "F": 1, "LA": 2, "La": 2, "PA": 4, "RGBA": 4, "RGBa": 4}
_PIL_BYTES = {"I": 4, "F": 4}


def _info(pil, head: bytes) -> ImageInfo:
    width, height = pil.size
    mode = pil.mode
    if mode == "P":
        channels = 4 if "transparency" in pil.info else 3
    else:
        channels = 1 if mode.startswith("I;16") else _OUT_CHANNELS.get(mode, 3)
    pixels = width * height
    if _is_16bit_colour(pil, head):
        sample = 2
        decode = pixels * channels * 2 * 3  # OpenCV's array, its RGB copy, the orientation copy
    else:
        sample = 2 if mode.startswith("I;16") else 4 if mode == "F" else 2 if mode == "I" else 1
        pil_bytes = 2 if mode.startswith("I;16") else _PIL_BYTES.get(mode, 1)
        # Pillow holds up to 4 bytes per band-pixel, and conversion / EXIF rotation make a second image.
        decode = pixels * (8 * pil_bytes + channels * sample)
    frames = 1
    if getattr(pil, "is_animated", False) and pil.format != "MPO":  # MPO: a camera JPEG with extra pictures
        try:
            frames = int(getattr(pil, "n_frames", 2))
        except Exception:
            frames = 2
    return ImageInfo(width, height, channels, sample, pil.format or "unknown", frames, int(decode))


def _decode(path: Path, data: bytes, limit: int | None = None, limit_text: str = "") -> Image:
    pil = _open_pil(path, io.BytesIO(data))
    if pil is None:
        # Pillow does not know the format; OpenCV might (and gives the final word). Its header cannot be read
        # first: OpenCV's own cap on decoded pixels (OPENCV_IO_MAX_IMAGE_PIXELS) bounds it, then the result is checked.
        pixels = _decode_with_opencv(data, orientation=1)
        if pixels is None:
            raise ImageReadError(path, "not a recognised image format (or the file is corrupt)") from None
        if limit is not None and pixels.nbytes > limit:
            raise ImageReadError(path, f"a {pixels.shape[1]}x{pixels.shape[0]} image of {_bytes(pixels.nbytes)}, above "
                                       f"{_bytes(limit)} ({limit_text}; --max-memory, or max_memory=..., raises the limit)")
        return Image(pixels=pixels, format="unknown")

    info = _info(pil, data[:32])
    if limit is not None and info.decode_bytes > limit:
        raise ImageReadError(
            path, f"a {info.width}x{info.height} image ({pil.mode}) needs about {_bytes(info.decode_bytes)} to decode, "
                  f"above {_bytes(limit)} ({limit_text}); not decoded (--max-memory, or max_memory=..., raises the limit)"
        )
    if info.frames > 1:
        raise ImageReadError(
            path, f"has {info.frames} frames (an animation or a multi-page file); esc-sr upscales single images and "
                  "would keep only the first: extract the frames first (e.g. ffmpeg -i in.gif frame_%04d.png)"
        )
    fmt = pil.format or "unknown"
    orientation = _exif_orientation(pil)
    try:
        if _is_16bit_colour(pil, data):
            pixels = _decode_with_opencv(data, orientation=orientation)
            if pixels is None:
                raise ImageReadError(path, "corrupt 16-bit image data")
            return Image(pixels=pixels, format=fmt, icc_profile=pil.info.get("icc_profile"))
        pil.load()
    except ImageReadError:
        raise
    except Exception as exc:  # truncated data, decoder errors, ...
        raise ImageReadError(path, f"corrupt or truncated image data ({_short(exc)})") from None

    if orientation != 1:
        from PIL import ImageOps

        pil = ImageOps.exif_transpose(pil)
    icc = pil.info.get("icc_profile") if pil.mode != "CMYK" else None
    try:
        pixels = pil_to_array(pil)
    except ValueError as exc:
        raise ImageReadError(path, str(exc)) from None
    return Image(pixels=pixels, format=fmt, icc_profile=icc)


def _exif_orientation(pil) -> int:
    try:
        value = pil.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # broken EXIF must not make a readable image unreadable
        return 1


def _is_16bit_colour(pil, data: bytes) -> bool:
    """True for RGB(A) PNG/TIFF files with 16 bits per sample (which Pillow would truncate)."""
    if pil.mode not in ("RGB", "RGBA"):
        return False
    if pil.format == "PNG":
        # IHDR is always the first chunk: 8-byte signature, length, b"IHDR", width, height, bit depth.
        return len(data) > 24 and data[12:16] == b"IHDR" and data[24] == 16
    if pil.format == "TIFF":
        bits = getattr(pil, "tag_v2", {}).get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(b == 16 for b in bits)
    return False


def _decode_with_opencv(data: bytes, *, orientation: int) -> np.ndarray | None:
    """Decode with OpenCV keeping the bit depth; returns RGB(A) order, or None if it cannot decode."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        return None
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
    if pixels.dtype not in (np.uint8, np.uint16, np.float32):
        pixels = pixels.astype(np.float32)
    return np.ascontiguousarray(_apply_orientation(pixels, orientation))


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxW[xC] array, as the EXIF spec defines it."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:  # transpose
        return np.swapaxes(pixels, 0, 1)
    if orientation == 6:  # rotate 90 clockwise
        return np.rot90(pixels, k=-1)
    if orientation == 7:  # transverse
        return np.rot90(pixels, k=1)[::-1]
    if orientation == 8:  # rotate 90 counter-clockwise
        return np.rot90(pixels, k=1)
    return pixels


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------- writing


def encode_image(pixels: np.ndarray, extension: str, *, quality: int = 95, icc_profile: bytes | None = None) -> bytes:
    """Encode pixels (layouts of this module) into the bytes of a file with ``extension``.

    PNG and TIFF keep 8 or 16 bits (float data is stored as 16-bit PNG or float TIFF). JPEG, WebP
    and BMP are 8-bit: 16-bit data is rounded down to 8 bits. JPEG and BMP cannot store alpha, so
    an image with alpha raises ``ValueError`` rather than silently losing it; so do float pixels with
    NaN or Inf (they would be written as black or as NaN) and a ``quality`` outside 0..100.
    """
    ext = extension.lower() if extension.startswith(".") else "." + extension.lower()
    if ext not in WRITABLE_EXTENSIONS:
        raise ValueError(f"cannot write {ext!r} files; use one of {', '.join(sorted(WRITABLE_EXTENSIONS))}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 0 to 100, not {quality!r}")
    if np.issubdtype(pixels.dtype, np.floating) and not bool(np.isfinite(pixels).all()):
        bad = int(np.count_nonzero(~np.isfinite(pixels)))
        raise ValueError(f"the pixels hold {bad:,} non-finite values (NaN or Inf); nothing was written")
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    has_alpha = pixels.ndim == 3 and pixels.shape[2] in (2, 4)

    if ext in (".png", ".tif", ".tiff"):
        return _encode_with_opencv(pixels, ext)

    if has_alpha and ext in (".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"{ext} cannot store the alpha channel of this image; write .png, .webp or .tif")
    pixels8 = _to_uint8(pixels)
    pil = array_to_pil(pixels8)
    buffer = io.BytesIO()
    options: dict = {}
    if ext in (".jpg", ".jpeg", ".webp"):
        options["quality"] = quality
    if icc_profile and ext in (".jpg", ".jpeg", ".webp"):
        options["icc_profile"] = icc_profile
    pil_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}[ext]
    pil.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def _encode_with_opencv(pixels: np.ndarray, ext: str) -> bytes:
    import cv2

    if pixels.dtype == np.float32 and ext == ".png":
        pixels = from_float(to_float(pixels), np.uint16)
    elif pixels.dtype not in (np.uint8, np.uint16, np.float32):
        raise ValueError(f"cannot encode pixels of dtype {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 2:
        # OpenCV has no gray+alpha layout: store it as RGBA with equal colour channels.
        gray, alpha = pixels[:, :, :1], pixels[:, :, 1:]
        pixels = np.concatenate([gray, gray, gray, alpha], axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(ext, pixels)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.dtype} {pixels.shape} image as {ext}")
    return encoded.tobytes()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either untouched or complete (:func:`esc_sr.atomic.write_bytes`)."""
    atomic.write_bytes(path, data)


def write_image(
    path: PathLike,
    pixels: np.ndarray,
    *,
    quality: int = 95,
    icc_profile: bytes | None = None,
) -> None:
    """Encode ``pixels`` by the extension of ``path`` and write the file atomically.

    Raises:
        ImageWriteError: unsupported extension, data the format cannot hold, or an OS error.
    """
    path = Path(path)
    try:
        data = encode_image(pixels, path.suffix, quality=quality, icc_profile=icc_profile)
    except ValueError as exc:
        raise ImageWriteError(path, str(exc)) from None
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise ImageWriteError(path, f"cannot write file ({exc.strerror or exc})") from None
