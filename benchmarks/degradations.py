"""Fixed, seeded degradations for measuring real-world ×4 models: what the real-model campaign validates on and what
``benchmarks.real_world`` and the tests compare with bicubic and Real-ESRGAN.

Three kinds, as issue 25's table defines its rows:

* ``web``: MATLAB bicubic /4, then JPEG at quality 35-70 (a photo downscaled and re-saved for the web);
* ``camera``: Gaussian blur (sigma 0.6-1.6), bicubic /4, Gaussian noise (sigma 2-8 of 255), JPEG at quality 60-90;
* ``clean``: MATLAB bicubic /4.

Every random choice comes from ``numpy.random.default_rng(seed)``, so one seed always gives the same input. Images are
HWC uint8 RGB arrays; the HR image is mod-cropped to a multiple of 4 first.
"""

from __future__ import annotations

import cv2
import numpy as np

from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # basicsr imports torchvision, which needs the shim next to the CPU torch
from basicsr.utils.matlab_functions import imresize  # noqa: E402

KINDS = ("web", "camera", "clean")
SCALE = 4


def modcrop(hr: np.ndarray, scale: int = SCALE) -> np.ndarray:
    h, w = hr.shape[:2]
    return hr[: h - h % scale, : w - w % scale]


def _bicubic_down(img: np.ndarray) -> np.ndarray:
    small = imresize(img.astype(np.float64) / 255.0, 1 / SCALE)
    return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode ``img`` (RGB uint8) as a baseline JPEG with OpenCV's libjpeg (4:2:0, as most web JPEGs)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def degrade(hr: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """The ×4 LR input of kind ``kind`` for the HR image ``hr`` (uint8 RGB, mod-cropped to 4), fixed by ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    if kind == "clean":
        return _bicubic_down(hr)
    if kind == "web":
        return jpeg(_bicubic_down(hr), int(rng.integers(35, 71)))
    sigma = float(rng.uniform(0.6, 1.6))
    blurred = cv2.GaussianBlur(hr, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    small = imresize(blurred.astype(np.float64) / 255.0, 1 / SCALE) * 255.0
    noisy = small + rng.normal(0.0, float(rng.uniform(2.0, 8.0)), small.shape)
    return jpeg(np.clip(np.round(noisy), 0, 255).astype(np.uint8), int(rng.integers(60, 91)))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` crop (the whole side where the image is smaller)."""
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top : top + size, left : left + size]
