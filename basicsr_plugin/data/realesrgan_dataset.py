"""``RealESRGANFolderDataset``: HR images plus the random blur kernels of Real-ESRGAN's second-order degradation.

The degradation itself runs batched in the model (``ESCRealMSEModel`` / ``ESCRealGANModel``); this dataset yields
the GT crop and three 21x21 kernels (first blur, second blur, final sinc) per image, sampled with BasicSR's own kernel
functions and the option names of the Real-ESRGAN / official ESC recipes (``blur_kernel_size``, ``kernel_list``,
``kernel_prob``, ``blur_sigma``, ``betag_range``, ``betap_range``, ``sinc_prob``, the same with a ``2`` suffix, and
``final_sinc_prob``).

Differences from BasicSR's ``RealESRGANDataset``:

* no ``meta_info`` file needed: ``dataroot_gt`` (one folder or a list) is scanned; ``meta_info`` still works;
* the GT crop/pad size is ``crop_pad_size`` (stock hard-codes 400, about 6 s/iteration on a 2-core CPU); with the
  official resize ranges it must be at least 74 (the first-order downscale to 0.15 must leave more than 10 pixels for
  the 21x21 blur of the second order; the models check this with a clear error);
* unreadable images raise an error naming the file instead of retrying random other files.

``RealESRGANDataset`` is registered as an alias so the official ESC option files (which use that name without
``meta_info``) work unchanged.
"""

from __future__ import annotations

import math
import os
import random

import cv2
import numpy as np
import torch
from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels
from basicsr.data.transforms import augment
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from basicsr_plugin.data.image_folder import ImageReader, folders_from_options, list_images

KERNEL_PAD_TO = 21  # every kernel is zero-padded to 21x21 so a batch can be stacked
DEFAULT_KERNEL_LIST = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
DEFAULT_KERNEL_PROB = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]


def _pad_kernel(kernel: np.ndarray) -> np.ndarray:
    pad = (KERNEL_PAD_TO - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def _sinc_cutoff(kernel_size: int) -> float:
    # Small kernels cannot represent very low cut-offs without ringing: Real-ESRGAN's ranges.
    low = np.pi / 3 if kernel_size < 13 else np.pi / 5
    return float(np.random.uniform(low, np.pi))


class BlurSettings:
    """One stage's kernel settings, read from the option dict with an optional key suffix ('' or '2')."""

    def __init__(self, opt: dict, suffix: str = "") -> None:
        self.kernel_list = opt.get(f"kernel_list{suffix}", DEFAULT_KERNEL_LIST)
        self.kernel_prob = opt.get(f"kernel_prob{suffix}", DEFAULT_KERNEL_PROB)
        self.sigma = opt.get(f"blur_sigma{suffix}", [0.2, 3] if not suffix else [0.2, 1.5])
        self.betag = opt.get(f"betag_range{suffix}", [0.5, 4])
        self.betap = opt.get(f"betap_range{suffix}", [1, 2])
        self.sinc_prob = float(opt.get(f"sinc_prob{suffix}", 0.1))
        max_size = int(opt.get(f"blur_kernel_size{suffix}", 21))
        self.kernel_sizes = list(range(7, max_size + 1, 2))

    def sample(self) -> np.ndarray:
        size = random.choice(self.kernel_sizes)
        if np.random.uniform() < self.sinc_prob:
            kernel = circular_lowpass_kernel(_sinc_cutoff(size), size, pad_to=False)
        else:
            kernel = random_mixed_kernels(self.kernel_list, self.kernel_prob, size, self.sigma, self.sigma,
                                          [-math.pi, math.pi], self.betag, self.betap, noise_range=None)
        return _pad_kernel(kernel)


def crop_or_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (right/bottom) up to ``size``, then take a random ``size`` x ``size`` crop."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_REFLECT_101)
        h, w = img.shape[:2]
    top, left = random.randint(0, h - size), random.randint(0, w - size)
    return img[top : top + size, left : left + size]


@DATASET_REGISTRY.register()
class RealESRGANFolderDataset(data.Dataset):
    """GT crops + degradation kernels for Real-ESRGAN-style training. See the module docstring."""

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        io_opt = dict(opt.get("io_backend", {"type": "disk"}))
        folders = folders_from_options(opt)
        if opt.get("meta_info"):
            with open(opt["meta_info"], encoding="utf-8") as handle:
                names = [line.strip().split(" ")[0] for line in handle if line.strip()]
            self.paths = [os.path.join(folders[0], n) for n in names]
        else:
            self.paths = list_images(folders, io_opt.get("type", "disk"))
        self.read = ImageReader(io_opt, lmdb_roots=folders)
        self.crop_pad_size = int(opt.get("crop_pad_size", 400))
        self.first = BlurSettings(opt, "")
        self.second = BlurSettings(opt, "2")
        self.final_sinc_prob = float(opt.get("final_sinc_prob", 0.8))
        self.final_sizes = self.first.kernel_sizes
        self.identity_kernel = torch.zeros(KERNEL_PAD_TO, KERNEL_PAD_TO)
        self.identity_kernel[KERNEL_PAD_TO // 2, KERNEL_PAD_TO // 2] = 1.0

    def __len__(self) -> int:
        return len(self.paths)

    def _final_sinc(self) -> torch.Tensor:
        if np.random.uniform() < self.final_sinc_prob:
            size = random.choice(self.final_sizes)
            cutoff = float(np.random.uniform(np.pi / 3, np.pi))
            return torch.from_numpy(circular_lowpass_kernel(cutoff, size, pad_to=KERNEL_PAD_TO)).float()
        return self.identity_kernel

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        gt = augment(self.read(path), self.opt.get("use_hflip", True), self.opt.get("use_rot", False))
        gt = np.ascontiguousarray(crop_or_pad(gt, self.crop_pad_size))
        return {
            "gt": img2tensor(gt, bgr2rgb=True, float32=True),
            "kernel1": torch.from_numpy(self.first.sample()).float(),
            "kernel2": torch.from_numpy(self.second.sample()).float(),
            "sinc_kernel": self._final_sinc(),
            "gt_path": path,
        }


@DATASET_REGISTRY.register()
class RealESRGANDataset(RealESRGANFolderDataset):
    """Alias of :class:`RealESRGANFolderDataset` under the name the official ESC option files use."""
