"""Bicubic downsampling of HR crops: MATLAB-compatible (default, the benchmark convention) or PIL."""

from __future__ import annotations

import numpy as np
from basicsr.utils.matlab_functions import imresize as matlab_imresize
from PIL import Image

DOWNSAMPLE_KERNELS = ("matlab", "pil")


def check_kernel(name: str) -> str:
    key = str(name).lower()
    if key not in DOWNSAMPLE_KERNELS:
        raise ValueError(f"unknown downsample kernel {name!r}; choose one of {', '.join(DOWNSAMPLE_KERNELS)}")
    return key


def bicubic_downsample(img: np.ndarray, factor: float, kernel: str = "matlab", size: tuple[int, int] | None = None) -> np.ndarray:
    """Downsample an HWC float image in [0, 1].

    Args:
        img: HWC float32 image in [0, 1].
        factor: downscale factor (>= 1); the output is ``img`` scaled by ``1 / factor``.
        kernel: ``'matlab'`` (MATLAB ``imresize`` bicubic with antialiasing, as used to make benchmark LR sets)
            or ``'pil'`` (PIL's antialiased bicubic, the official ESC DFLIP recipe).
        size: optional exact output (height, width); PIL only honours it exactly, MATLAB uses ``1 / factor``.

    Returns:
        HWC float32 image in [0, 1], not quantised.
    """
    kernel = check_kernel(kernel)
    h, w = img.shape[:2]
    out_h, out_w = size if size is not None else (round(h / factor), round(w / factor))
    if kernel == "matlab":
        out = matlab_imresize(np.ascontiguousarray(img), 1.0 / factor)
        out = out[:out_h, :out_w]
        if out.shape[0] != out_h or out.shape[1] != out_w:  # ceil() rounding of non-integer factors
            out = np.pad(out, ((0, out_h - out.shape[0]), (0, out_w - out.shape[1]), (0, 0)), mode="edge")
        return np.clip(out, 0.0, 1.0).astype(np.float32)
    # PIL works on 8-bit images; HR crops come from 8-bit files, so rounding here is lossless.
    channels = [Image.fromarray(np.clip(np.round(img[..., c] * 255.0), 0, 255).astype(np.uint8), mode="L") for c in range(img.shape[2])]
    resized = [np.asarray(ch.resize((out_w, out_h), Image.BICUBIC), dtype=np.float32) for ch in channels]
    return np.stack(resized, axis=2) / 255.0
