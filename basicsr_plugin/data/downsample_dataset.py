"""``DownsampleImageDataset``: LR/HR pairs made on the fly from folders of HR images (the DFLIP recipe).

Training (``phase: train``): a random ``gt_size`` crop of an HR image, flips/rotations, then the LR crop by
bicubic downsampling (MATLAB-compatible by default, ``downsample_kernel: pil`` for the official DFLIP recipe).
Validation (any other phase, or ``whole_image: true``): the whole HR image cropped to a multiple of the scale and its
MATLAB-bicubic LR, the convention the Set5/Set14/B100/Urban100/Manga109 LR sets are made with, so a benchmark needs
only its HR folder.

Options: ``dataroot_gt`` (a folder) and/or ``dataroots_gt`` (a list of folders), ``scale``, ``gt_size``, ``use_hflip``, ``use_rot``,
``downsample_kernel`` (``matlab``|``pil``), ``quantize_lq`` (default true: round the LR to 8 bits, like a saved PNG),
``io_backend`` (``disk`` or ``lmdb``), ``whole_image``, ``cache_lq`` (default false).

``cache_lq: true`` downsamples each *whole* HR image once per worker process and keeps its LR in memory; training
crops are then taken in pairs (LR crop and the aligned HR crop). The LR then is exactly the benchmark convention
(whole-image MATLAB bicubic after modcrop) and the per-sample cost is a crop instead of a bicubic resize, which
matters on a small CPU. The LR cache holds 1/scale^2 of the pixels of the dataset per worker.
"""

from __future__ import annotations

import random

import numpy as np
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from basicsr_plugin.data.downsampling import bicubic_downsample, check_kernel
from basicsr_plugin.data.image_folder import ImageReader, folders_from_options, list_images, modcrop, quantize_uint8


def random_crop(img: np.ndarray, size: int, path: str) -> np.ndarray:
    """A random ``size`` x ``size`` crop; a clear error when the image is smaller."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"{path}: image is {w}x{h}, smaller than the training crop gt_size={size}")
    top, left = random.randint(0, h - size), random.randint(0, w - size)
    return img[top : top + size, left : left + size]


@DATASET_REGISTRY.register()
class DownsampleImageDataset(data.Dataset):
    """HR folder(s) -> (lq, gt) pairs with on-the-fly bicubic downsampling. See the module docstring."""

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        self.scale = int(opt["scale"])
        self.kernel = check_kernel(opt.get("downsample_kernel", "matlab"))
        self.quantize = bool(opt.get("quantize_lq", True))
        self.whole_image = bool(opt.get("whole_image", opt.get("phase", "train") != "train"))
        if not self.whole_image:
            self.gt_size = int(opt["gt_size"])
            if self.gt_size % self.scale:
                raise ValueError(f"gt_size {self.gt_size} is not a multiple of scale {self.scale}")
        io_opt = dict(opt.get("io_backend", {"type": "disk"}))
        folders = folders_from_options(opt)
        self.paths = list_images(folders, io_opt.get("type", "disk"))
        self.read = ImageReader(io_opt, lmdb_roots=folders)
        self.cache_lq = bool(opt.get("cache_lq", False))
        self._lq_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        hr = self.read(path)
        if self.whole_image or self.cache_lq:
            hr = np.ascontiguousarray(modcrop(hr, self.scale))
            lr = self._lq_cache.get(index) if self.cache_lq else None
            if lr is None:
                lr = bicubic_downsample(hr, self.scale, self.kernel)
                if self.quantize:
                    lr = quantize_uint8(lr)
                if self.cache_lq:
                    self._lq_cache[index] = lr
            if not self.whole_image:
                hr, lr = paired_random_crop(hr, lr, self.gt_size, self.scale, path)
                hr, lr = hr.copy(), lr.copy()  # BasicSR's augment flips in place: never touch the cached LR
                hr, lr = augment([hr, lr], self.opt.get("use_hflip", False), self.opt.get("use_rot", False))
        else:
            hr = random_crop(hr, self.gt_size, path).copy()
            hr = augment(hr, self.opt.get("use_hflip", False), self.opt.get("use_rot", False))
            lr = bicubic_downsample(np.ascontiguousarray(hr), self.scale, self.kernel)
            if self.quantize:
                lr = quantize_uint8(lr)
        gt_t, lq_t = img2tensor([hr, lr], bgr2rgb=True, float32=True)
        return {"lq": lq_t, "gt": gt_t, "lq_path": path, "gt_path": path}
