"""PSNR/SSIM of a model and of bicubic on a folder of HR images, by the paper's protocol, with BasicSR's functions.

The protocol is ``test.py``'s (``DownsampleImageDataset`` in whole-image mode + ``ESRModel.test``): HR cropped to a
multiple of the scale, LR by MATLAB-compatible bicubic rounded to 8 bits, LR reflect-padded to the window, output
cropped and rounded to 8 bits, PSNR/SSIM on the Y channel with ``crop_border`` = scale. Bicubic is MATLAB ``imresize``
of the same LR. It serves the default model's export script and its test, in one process and without option files.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize

from esc_arch import pad_to_multiple

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


@torch.no_grad()
def evaluate_folder(model: torch.nn.Module, hr_folder: str | Path, *, scale: int) -> dict[str, float]:
    """Mean ``psnr``/``ssim`` of ``model`` and ``bicubic_psnr``/``bicubic_ssim`` over the images of ``hr_folder``."""
    paths = sorted(p for p in Path(hr_folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{hr_folder}: no images")
    multiple = int(getattr(model, "window_size", 1))
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    for path in paths:
        hr = cv2.imread(str(path), cv2.IMREAD_COLOR).astype(np.float32) / 255.0  # BGR, as BasicSR reads
        h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
        hr = hr[:h, :w]
        lr = _to_uint8(imresize(hr, 1.0 / scale)).astype(np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(lr[:, :, ::-1].transpose(2, 0, 1))).unsqueeze(0)
        sr = model(pad_to_multiple(x, multiple))[..., : h, : w].squeeze(0).clamp(0, 1).numpy()
        sr = _to_uint8(sr.transpose(1, 2, 0)[:, :, ::-1])
        bicubic = _to_uint8(imresize(lr, scale))[:h, :w]
        gt = _to_uint8(hr)
        for prefix, out in (("", sr), ("bicubic_", bicubic)):
            totals[prefix + "psnr"] += calculate_psnr(out, gt, crop_border=scale, test_y_channel=True)
            totals[prefix + "ssim"] += calculate_ssim(out, gt, crop_border=scale, test_y_channel=True)
    return {name: value / len(paths) for name, value in totals.items()}
