"""Alpha that arrives apart from the image (a host's mask), joined to it for :func:`esc_sr.upscale` and split off
the result again.

:func:`esc_sr.upscale` upscales a fourth channel as alpha (``alpha='model'`` or ``'resize'``,
:data:`esc_sr.facts.ALPHA_MODES`). A host whose alpha is a separate plane, of another size or for one image of a
batch (ComfyUI's MASK), makes it fit the image here instead of each host doing it its own way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fit_alpha", "join_alpha", "split_alpha"]


def fit_alpha(alpha: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """An alpha plane ``[B', 1, h, w]`` (1 = opaque) made to fit an image ``[B, 3, H, W]``: in its dtype and on its
    device, resized bilinearly (and clamped to 0..1) when the sizes differ, one plane given to every image of the
    batch, extra planes dropped."""
    alpha = alpha.to(rgb)
    if alpha.shape[-2:] != rgb.shape[-2:]:
        alpha = F.interpolate(alpha, size=rgb.shape[-2:], mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    if alpha.shape[0] != rgb.shape[0]:
        alpha = alpha[:1].expand(rgb.shape[0], -1, -1, -1) if alpha.shape[0] == 1 else alpha[: rgb.shape[0]]
    return alpha


def join_alpha(rgb: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """The planes to upscale: ``rgb`` ``[B, 3, H, W]``, with ``alpha`` (fitted, :func:`fit_alpha`) as a fourth
    channel when there is one."""
    return rgb if alpha is None else torch.cat([rgb, fit_alpha(alpha, rgb)], 1)


def split_alpha(planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rgb, alpha or None)`` of upscaled planes ``[B, 3 or 4, H, W]``."""
    return planes[:, :3], (planes[:, 3:4] if planes.shape[1] == 4 else None)
