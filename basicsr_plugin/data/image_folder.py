"""Listing and reading HR images for the plugin's datasets (disk folders, several at once, or one lmdb)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from basicsr.data.data_util import paths_from_lmdb
from basicsr.utils import FileClient, imfrombytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def folders_from_options(opt: dict) -> list[str]:
    """HR folders of a dataset: ``dataroot_gt`` (one folder) and/or ``dataroots_gt`` (a list of folders).

    BasicSR expands ``~`` in ``dataroot_gt`` itself and requires it to be a string, hence the separate list key (the
    default-model recipe trains on two folders).
    """
    folders: list[str] = []
    if opt.get("dataroot_gt") is not None:
        folders.append(os.fspath(opt["dataroot_gt"]))
    extra = opt.get("dataroots_gt") or []
    if isinstance(extra, (str, os.PathLike)):
        extra = [extra]
    folders.extend(os.path.expanduser(os.fspath(f)) for f in extra)
    if not folders:
        raise ValueError(f"dataset {opt.get('name', '?')!r}: set 'dataroot_gt' (a folder) or 'dataroots_gt' (a list)")
    return folders


def list_images(folders: Iterable[str], io_backend: str = "disk") -> list[str]:
    """All image paths under the folders (recursively, sorted per folder), or the keys of lmdb databases."""
    paths: list[str] = []
    folders = list(folders)
    if io_backend == "lmdb":
        if len(folders) != 1:
            raise ValueError(f"io_backend lmdb reads exactly one database, got {len(folders)}: {folders}")
        return list(paths_from_lmdb(folders[0]))
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: image folder does not exist (relative paths are resolved from {os.getcwd()})")
        found = []
        for root, _dirs, files in os.walk(folder):
            found.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        paths.extend(sorted(found))
    return paths


class ImageReader:
    """Reads an image as float32 BGR HWC in [0, 1] (grayscale files become 3 channels), via BasicSR's FileClient.

    The FileClient is created lazily so the dataset stays picklable for DataLoader worker processes.
    """

    def __init__(self, io_backend_opt: dict, lmdb_roots: Sequence[str] | None = None) -> None:
        self.io_backend_opt = dict(io_backend_opt)
        self.backend = self.io_backend_opt.pop("type", "disk")
        self.lmdb_roots = list(lmdb_roots or [])
        self._client: FileClient | None = None

    def __call__(self, path: str) -> np.ndarray:
        if self._client is None:
            if self.backend == "lmdb":
                self._client = FileClient("lmdb", db_paths=self.lmdb_roots[:1], client_keys=["gt"])
            else:
                self._client = FileClient(self.backend, **self.io_backend_opt)
        try:
            raw = self._client.get(path, "gt")
        except OSError as error:
            raise OSError(f"{path}: cannot read image file ({error})") from error
        try:
            img = imfrombytes(raw, flag="color", float32=True)
        except Exception as error:  # cv2 raises its own error type on undecodable bytes
            raise ValueError(f"{path}: not a decodable image ({error})") from error
        if img is None:
            raise ValueError(f"{path}: not a decodable image")
        return img


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of ``scale`` (top-left anchored), the benchmark convention."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def quantize_uint8(img: np.ndarray) -> np.ndarray:
    """Round to 8-bit levels, as an LR image saved to PNG would be."""
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.float32) / 255.0
