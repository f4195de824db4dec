"""``ArbitraryScaleDataset``: training samples for arbitrary-scale SR (ESC + LTE), the LIIF/LTE recipe.

Training (``phase: train``): a scale s ~ U(``scale_min``, ``scale_max``) per sample, an HR crop of round(``lq_size``*s)
pixels, flips/rotations, the LR crop of ``lq_size`` x ``lq_size`` by bicubic downsampling, and ``sample_q`` random HR
pixels as queries: ``coord`` (Q, 2) pixel centres in [-1, 1] (y, x), ``cell`` (Q, 2) pixel sizes, ``gt`` (Q, 3) RGB.

Validation (other phases): a fixed ``scale`` (integer or not, inside or outside the training range, e.g. 2 or 6);
the whole HR image cropped to a multiple of round(scale) when the scale is integral, with its MATLAB-bicubic LR;
``gt`` is then the full (3, H, W) image and the model renders it with ``upscale_by``.

Options: ``dataroot_gt``, ``lq_size`` (64 in the paper), ``scale_min`` (1), ``scale_max`` (4), ``sample_q`` (2304),
``use_hflip``, ``use_rot``, ``downsample_kernel`` (``pil`` default for training as in LTE, ``matlab`` for validation),
``quantize_lq``, ``scale`` (validation), ``io_backend``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from basicsr.data.transforms import augment
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from esc_arch.lte import make_coord

from basicsr_plugin.data.downsample_dataset import random_crop
from basicsr_plugin.data.downsampling import bicubic_downsample, check_kernel
from basicsr_plugin.data.image_folder import ImageReader, folders_from_options, list_images, quantize_uint8


@DATASET_REGISTRY.register()
class ArbitraryScaleDataset(data.Dataset):
    """HR folder(s) -> arbitrary-scale training queries or whole-image validation pairs (module docstring)."""

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        self.train = opt.get("phase", "train") == "train"
        io_opt = dict(opt.get("io_backend", {"type": "disk"}))
        folders = folders_from_options(opt)
        self.paths = list_images(folders, io_opt.get("type", "disk"))
        self.read = ImageReader(io_opt, lmdb_roots=folders)
        self.quantize = bool(opt.get("quantize_lq", True))
        if self.train:
            self.lq_size = int(opt.get("lq_size", 64))
            self.scale_min = float(opt.get("scale_min", 1.0))
            self.scale_max = float(opt.get("scale_max", 4.0))
            if not 1.0 <= self.scale_min <= self.scale_max:
                raise ValueError(f"need 1 <= scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
            self.sample_q = int(opt.get("sample_q", 2304))
            self.kernel = check_kernel(opt.get("downsample_kernel", "pil"))
        else:
            self.scale = float(opt["scale"])
            if self.scale < 1:
                raise ValueError(f"validation scale must be >= 1, got {self.scale}")
            self.kernel = check_kernel(opt.get("downsample_kernel", "matlab"))

    def __len__(self) -> int:
        return len(self.paths)

    def _validation_item(self, path: str, hr: np.ndarray) -> dict:
        step = round(self.scale) if float(self.scale).is_integer() else 1
        h, w = hr.shape[:2]
        hr = hr[: h - h % step, : w - w % step]
        lq_h, lq_w = max(1, round(hr.shape[0] / self.scale)), max(1, round(hr.shape[1] / self.scale))
        lr = bicubic_downsample(np.ascontiguousarray(hr), self.scale, self.kernel, size=(lq_h, lq_w))
        if self.quantize:
            lr = quantize_uint8(lr)
        gt_t, lq_t = img2tensor([hr, lr], bgr2rgb=True, float32=True)
        return {"lq": lq_t, "gt": gt_t, "scale": torch.tensor(self.scale), "lq_path": path, "gt_path": path}

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        hr = self.read(path)
        if not self.train:
            return self._validation_item(path, hr)
        scale = random.uniform(self.scale_min, self.scale_max)
        hr_size = round(self.lq_size * scale)
        hr = augment(random_crop(hr, hr_size, path), self.opt.get("use_hflip", True), self.opt.get("use_rot", True))
        hr = np.ascontiguousarray(hr)
        lr = bicubic_downsample(hr, hr_size / self.lq_size, self.kernel, size=(self.lq_size, self.lq_size))
        if self.quantize:
            lr = quantize_uint8(lr)
        gt_t, lq_t = img2tensor([hr, lr], bgr2rgb=True, float32=True)
        coord = make_coord(hr_size, hr_size)
        rgb = gt_t.permute(1, 2, 0).reshape(-1, 3)
        picks = torch.from_numpy(np.random.choice(coord.shape[0], self.sample_q, replace=coord.shape[0] < self.sample_q))
        cell = torch.full((self.sample_q, 2), 2.0 / hr_size)
        return {"lq": lq_t, "coord": coord[picks], "cell": cell, "gt": rgb[picks], "scale": torch.tensor(scale),
                "gt_path": path, "lq_path": path}
