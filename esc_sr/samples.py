"""Pixel samples: PIL images to arrays and back, uint8 / uint16 / float conversions, and the quality resize
(chainner-ext's Lanczos).

Part of :mod:`esc_sr.images`' API (which re-exports these names); a module of its own to keep each short.
"""

from __future__ import annotations

import numpy as np


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float pixels -> float32 in [0, 1] (float input is passed through as float32)."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    if np.issubdtype(pixels.dtype, np.floating):
        return pixels.astype(np.float32, copy=False)
    raise TypeError(f"unsupported pixel dtype {pixels.dtype} (expected uint8, uint16 or float)")


def from_float(values: np.ndarray, dtype: np.dtype | type, *, inplace: bool = False) -> np.ndarray:
    """float pixels in [0, 1] -> ``dtype`` (clamped; integers rounded to nearest).

    ``inplace=True`` lets the conversion overwrite ``values`` (a float32 array the caller no
    longer needs), so a large image needs no second float copy.
    """
    dtype = np.dtype(dtype)
    work = values if inplace and values.dtype == np.float32 else values.astype(np.float32)
    np.clip(work, 0.0, 1.0, out=work)
    if dtype == np.uint8 or dtype == np.uint16:
        work *= 255.0 if dtype == np.uint8 else 65535.0
        return np.rint(work, out=work).astype(dtype)
    return work.astype(dtype, copy=False)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return from_float(to_float(pixels), np.uint8)


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """High-quality resize of float32 ``HxW[xC]`` pixels to ``size = (width, height)``.

    Uses chainner-ext's Lanczos filter (what chaiNNer uses for quality downscaling), without gamma
    correction so results match other tools; Lanczos overshoot is clamped back into [0, 1].
    """
    import chainner_ext

    width, height = size
    squeeze = values.ndim == 2
    src = np.ascontiguousarray(values, dtype=np.float32)
    out = chainner_ext.resize(src, (int(width), int(height)), chainner_ext.ResizeFilter.Lanczos, False)
    out = np.clip(out, 0.0, 1.0)
    if squeeze:
        out = out[:, :, 0]
    return out


def pil_to_array(pil) -> np.ndarray:
    """Convert a PIL image of any common mode to the numpy layouts of this module."""
    mode = pil.mode
    if mode == "1":
        pil = pil.convert("L")
    elif mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    elif mode == "PA":
        pil = pil.convert("RGBA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        pil = pil.convert("RGB")
    elif mode == "RGBa":
        pil = pil.convert("RGBA")
    elif mode == "La":
        pil = pil.convert("LA")
    elif mode == "RGBX":
        pil = pil.convert("RGB")

    mode = pil.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.array(pil, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.array(pil).astype(np.uint16)
    if mode == "I":
        values = np.array(pil)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError("32-bit integer pixel values outside 0..65535 are not supported")
        return values.astype(np.uint16)
    if mode == "F":
        return np.array(pil, dtype=np.float32)
    raise ValueError(f"unsupported image mode {mode!r}")


def array_to_pil(pixels: np.ndarray):
    """Inverse of :func:`pil_to_array` for what PIL can hold (8-bit any layout, 16-bit gray, float gray)."""
    from PIL import Image as PILImage

    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    # Pillow infers L / LA / RGB / RGBA / I;16 / F from dtype and shape.
    if pixels.dtype == np.uint8 and (pixels.ndim == 2 or pixels.shape[2] in (2, 3, 4)):
        return PILImage.fromarray(pixels)
    if pixels.dtype in (np.uint16, np.float32) and pixels.ndim == 2:
        return PILImage.fromarray(pixels)
    raise ValueError(
        f"PIL cannot hold a {pixels.dtype} image with shape {pixels.shape}; use a numpy array instead"
    )
