"""Image kinds in and out of the engine: tensors, numpy arrays and PIL images as float32 ``(1, C, H, W)`` planes, and
back to the kind, layout and dtype they came as."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .errors import EngineError, ImageWarning

@dataclass
class Planes:
    """An image as ``(1, C, H, W)`` float32 planes plus what is needed to give it back as it came."""

    planes: list[torch.Tensor]  # one (1, C, H, W) tensor per batch item
    restore: Callable[[list[torch.Tensor]], Any]


def from_tensor(image: torch.Tensor) -> Planes:
    if image.ndim not in (3, 4):
        raise EngineError(f"expected an NCHW or CHW tensor, got shape {tuple(image.shape)}")
    batched = image.ndim == 4
    x = image if batched else image.unsqueeze(0)
    if x.shape[1] not in (1, 2, 3, 4):
        raise EngineError(f"expected 1-4 channels (gray, gray+alpha, RGB, RGBA), got {x.shape[1]}")
    if not torch.is_floating_point(x):
        raise EngineError(f"expected a float tensor in [0, 1], got {x.dtype}")
    device, dtype = image.device, image.dtype
    planes = [finite_input(x[i : i + 1].detach().to("cpu", torch.float32)) for i in range(x.shape[0])]

    def restore(outs: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(outs, 0).to(device=device, dtype=dtype)
        return y if batched else y[0]

    return Planes(planes, restore)


def from_numpy(image: np.ndarray) -> Planes:
    from . import images

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
        raise EngineError(f"expected an HxW or HxWxC (C = 1..4) array, got shape {image.shape}")
    dtype = image.dtype
    try:
        values = images.to_float(image)
    except TypeError as exc:
        raise EngineError(str(exc)) from None
    layout_2d = image.ndim == 2
    hwc = values[:, :, None] if layout_2d else values
    planes = [finite_input(torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None])]

    def restore(outs: list[torch.Tensor]) -> np.ndarray:
        result = outs[0][0].numpy().transpose(1, 2, 0)  # a view of the engine's own output canvas
        if layout_2d:
            result = result[:, :, 0]
        return np.ascontiguousarray(images.from_float(result, dtype, inplace=True))

    return Planes(planes, restore)


def finite_input(planes: torch.Tensor) -> torch.Tensor:
    """Input pixels as the model can take them: NaN and -Inf become 0, +Inf becomes 1, with a warning.

    One NaN would spread through every window and layer it touches (the whole output, past the first global
    average), and a float TIFF can hold them; the documented choice is to clamp them, as out-of-range values are
    clamped, and say so."""
    if not planes.is_floating_point() or bool(torch.isfinite(planes).all()):
        return planes
    bad = int((~torch.isfinite(planes)).sum())
    warnings.warn(
        f"the image has {bad:,} non-finite pixel value{'s' * (bad != 1)} (NaN or Inf); replaced: NaN and -Inf by 0, "
        "+Inf by 1", ImageWarning, stacklevel=4,
    )
    return torch.nan_to_num(planes, nan=0.0, posinf=1.0, neginf=0.0)


def from_pil(image: Any) -> Planes:
    from . import images

    inner = from_numpy(images.pil_to_array(image))
    return Planes(inner.planes, lambda outs: images.array_to_pil(inner.restore(outs)))


def is_pil(image: Any) -> bool:
    try:
        from PIL import Image as PILImage
    except ImportError:
        return False
    return isinstance(image, PILImage.Image)


def geometry(image: Any) -> tuple[int, int, int, int, int]:
    """``(height, width, channels, batch, bytes per sample)`` of an image of any kind, read from its shape alone
    (unrecognised kinds and layouts give zeros here and are reported by the conversion)."""
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.ndim == 3:
            shape = (1, *shape)
        if len(shape) != 4:
            return 1, 1, 3, 1, 4
        return shape[2], shape[3], shape[1], shape[0], 4
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            return 1, 1, 3, 1, 1
        channels = 1 if image.ndim == 2 else image.shape[2]
        return image.shape[0], image.shape[1], channels, 1, max(1, min(4, image.dtype.itemsize))
    if is_pil(image):
        width, height = image.size
        return height, width, max(1, min(4, len(image.getbands()))), 1, 1 if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else 4
    return 1, 1, 3, 1, 1
