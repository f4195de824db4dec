"""Arbitrary-scale ESC: the ESC trunk as an encoder with the LTE implicit decoder (Lee & Jin, 2022).

The decoder predicts RGB at any continuous coordinate from the nearest latent of each of four
surrounding cells (local ensemble), through a Fourier-like local texture estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ESCModelBase, SharedKernelTrunk
from .blocks import make_blocks, shared_large_kernel


def make_coord(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates of an ``height`` x ``width`` grid in [-1, 1], as (H*W, 2) in (y, x) order."""
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).view(-1, 2)


class ESCEncoder(SharedKernelTrunk):
    """The ESC trunk without an upsampler or image residual (esc_arb's encoder): image -> features."""

    arch_name = "ESCEncoder"

    def __init__(
        self,
        *,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        exp_ratio: float = 1.25,
        attn_type: str = "sdpa",
    ) -> None:
        super().__init__()
        self._record(locals())
        self.scale = 1
        self.window_size = window_size
        self.out_dim = dim
        self.plk_filter = shared_large_kernel(pdim, kernel_size)
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = make_blocks(
            n_blocks=n_blocks, dim=dim, pdim=pdim, conv_blocks=conv_blocks, window_size=window_size,
            num_heads=num_heads, exp_ratio=exp_ratio, use_ln=False, attn_type=attn_type,
        )
        self.last = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        return self.last(self.run_blocks(feat)) + feat


class MLP(nn.Module):
    """Linear/ReLU stack with upstream's key names (``layers.0``, ``layers.2`` ...)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ESCLTE(ESCModelBase):
    """ESC encoder + LTE decoder: ``forward(lr, coord, cell)`` returns RGB at each query.

    ``coord`` (B, Q, 2) are (y, x) positions in [-1, 1] of the output pixels' centres, ``cell``
    (B, Q, 2) their sizes in the same units.  ``upscale_by(lr, factor)`` renders a whole image.
    Inputs and outputs are in [0, 1] without normalisation, like the upstream module.
    """

    arch_name = "ESCLTE"
    arbitrary_scale = True
    # Measured on the golden case: fp16 max error 0.35, bf16 0.83 (the query coordinates and areas need fp32).
    supports_half = False
    #: The top of the training range (x1-x4); beyond it, cells are enlarged (see :meth:`query_cell`).
    trained_scale_max: float = 4.0

    def __init__(
        self,
        *,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        exp_ratio: float = 1.25,
        hidden_dim: int = 256,
        mlp_hidden: tuple[int, ...] = (256, 256, 256),
        attn_type: str = "sdpa",
    ) -> None:
        super().__init__()
        self._record(locals())
        self.hyperparameters["mlp_hidden"] = tuple(mlp_hidden)
        self.scale = 1  # any; see upscale_by
        self.window_size = window_size
        self.encoder = ESCEncoder(
            dim=dim, pdim=pdim, kernel_size=kernel_size, n_blocks=n_blocks, conv_blocks=conv_blocks,
            window_size=window_size, num_heads=num_heads, exp_ratio=exp_ratio, attn_type=attn_type,
        )
        self.coef = nn.Conv2d(dim, hidden_dim, 3, padding=1)
        self.freq = nn.Conv2d(dim, hidden_dim, 3, padding=1)
        self.phase = nn.Linear(2, hidden_dim // 2, bias=False)
        self.imnet = MLP(hidden_dim, 3, list(mlp_hidden))

    def encode(self, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the encoder once, for any number of :meth:`query` calls: (lr, coefficient map, frequency map, the
        feature map's coordinate grid, its (h, w) as a tensor). What depends only on the LR image is made here,
        not per query chunk."""
        return self.encoded(lr, *self.encode_maps(lr))

    def encode_maps(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The coefficient and frequency maps of ``lr``."""
        feat = self.encoder(lr)
        return self.coef(feat), self.freq(feat)

    def encoded(self, lr: torch.Tensor, coef: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`encode`'s tuple from the maps of :meth:`encode_maps`."""
        b, h, w = lr.shape[0], coef.shape[-2], coef.shape[-1]
        feat_coord = make_coord(h, w, device=lr.device, dtype=lr.dtype).view(1, h, w, 2).permute(0, 3, 1, 2)
        # Stacked from the shape rather than torch.tensor([h, w]): a traced ONNX export then keeps it symbolic.
        size = torch.stack([torch.as_tensor(h), torch.as_tensor(w)]).to(device=lr.device, dtype=lr.dtype)
        return lr, coef, freq, feat_coord.expand(b, 2, h, w), size

    def query(self, encoded, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """RGB (B, Q, 3) at ``coord`` with ``cell`` sizes, from :meth:`encode`'s output."""
        lr, coef, freq, feat_coord, size = encoded
        b, q = coord.shape[:2]
        h, w = coef.shape[-2:]
        rel_cell = cell * size
        phase = self.phase(rel_cell.reshape(b * q, 2)).view(b, q, -1)

        def sample(grid_src: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
            grid = at.flip(-1).unsqueeze(1)
            return F.grid_sample(grid_src, grid, mode="nearest", align_corners=False)[:, :, 0, :].permute(0, 2, 1)

        preds, areas = [], []
        for vy in (-1, 1):
            for vx in (-1, 1):
                shifted = coord.clone()
                shifted[..., 0] += vy / h + 1e-6
                shifted[..., 1] += vx / w + 1e-6
                shifted.clamp_(-1 + 1e-6, 1 - 1e-6)
                q_coef = sample(coef, shifted)
                q_freq = sample(freq, shifted)
                rel_coord = (coord - sample(feat_coord, shifted)) * size
                # frequencies are interleaved (fy0, fx0, fy1, fx1, ...): dot each pair with rel_coord
                q_freq = (q_freq.view(b, q, -1, 2) * rel_coord.unsqueeze(-2)).sum(-1) + phase
                basis = torch.cat([torch.cos(math.pi * q_freq), torch.sin(math.pi * q_freq)], dim=-1)
                preds.append(self.imnet((q_coef * basis).reshape(b * q, -1)).view(b, q, -1))
                areas.append((rel_coord[..., 0] * rel_coord[..., 1]).abs() + 1e-9)
        total = torch.stack(areas).sum(0)
        # each prediction is weighted by the area of the diagonally opposite sub-rectangle
        out = sum(pred * (area / total).unsqueeze(-1) for pred, area in zip(preds, reversed(areas)))
        base = F.grid_sample(lr, coord.flip(-1).unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
        return out + base[:, :, 0, :].permute(0, 2, 1)

    def forward(self, lr: torch.Tensor, coord: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.query(self.encode(lr), coord, cell)

    @classmethod
    def query_cell(cls, in_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[float, float]:
        """The (height, width) of one output pixel in the [-1, 1] frame of the LR image.

        Beyond the training range the cell is enlarged by ``factor / trained_scale_max``, as upstream's test
        script does: the decoder has never seen smaller cells.
        """
        (h, w), (out_h, out_w) = in_size, out_size
        cell = (2.0 / out_h, 2.0 / out_w)
        ratio = max(out_h / h, out_w / w)
        if ratio > cls.trained_scale_max:
            cell = (cell[0] * ratio / cls.trained_scale_max, cell[1] * ratio / cls.trained_scale_max)
        return cell

    @torch.no_grad()
    def upscale_by(
        self,
        lr: torch.Tensor,
        factor: float | None = None,
        *,
        size: tuple[int, int] | None = None,
        max_queries: int = 65536,
        encode=None,
    ) -> torch.Tensor:
        """Upscale a (B, 3, h, w) image by any real ``factor`` (or to ``size`` = (H, W)).

        The encoder runs once (``encode``: another implementation of :meth:`encode`, e.g. a layer-streamed one); the
        output pixels are decoded in chunks of ``max_queries`` so memory stays bounded for any output size.  Cells
        follow :meth:`query_cell`.
        """
        h, w = lr.shape[-2:]
        if size is None:
            if factor is None or factor <= 0:
                raise ValueError("give a positive factor or an output size")
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
        out_h, out_w = size
        coord = make_coord(out_h, out_w, device=lr.device, dtype=lr.dtype)
        cell = torch.tensor(self.query_cell((h, w), size), device=lr.device, dtype=lr.dtype).expand_as(coord)
        encoded = (encode or self.encode)(lr)
        b = lr.shape[0]
        chunks = []
        for start in range(0, coord.shape[0], max_queries):
            part = slice(start, start + max_queries)
            chunks.append(self.query(encoded, coord[part].expand(b, -1, -1), cell[part].expand(b, -1, -1)))
        rgb = torch.cat(chunks, dim=1)
        return rgb.transpose(1, 2).reshape(b, 3, out_h, out_w)
