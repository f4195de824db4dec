"""`supports_half` / `supports_bfloat16` are measured, not assumed: each descriptor that claims a
reduced precision gives finite outputs close to fp32 in it (on ``--device``: CPU unless ``pytest --device
cuda``), and each that refuses one has a measured reason to (documented in esc_arch/spandrel and
docs/spandrel_chainner.md)."""

from __future__ import annotations

import pytest
import torch

from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # spandrel imports torchvision (PyPI's CUDA wheel next to the CPU torch here)

from esc_arch.spandrel import install  # noqa: E402
from spandrel import ModelLoader, UnsupportedDtypeError  # noqa: E402

from golden import GOLDEN_DIR

# Observed on the golden weights (max |Δ| of clamped outputs vs fp32): fp16 <= 0.006, bf16 <= 0.045
# (bf16 keeps 8 bits of mantissa; mean |Δ| ~0.002).
FP16_MAX, BF16_MAX, BF16_MEAN = 0.02, 0.1, 0.005

# One checkpoint per architecture and head that claims both precisions.
SAFE = [
    "esc_xl_shaped_x4",
    "esc_fp_x4",
    "escrealm_pixelshuffle_x3",
    "escrealm_nearestconv_x2_unshuffle",
    "trainner_escrealm_x4",
    "neosr_esc_real_dysample_x4",  # DySample samples in fp32 internally
    "escrealm_dysample_x4",
]


@pytest.fixture(autouse=True, scope="module")
def _installed():
    install()


def _load(case_id: str):
    return ModelLoader().load_from_file(next(GOLDEN_DIR.glob(f"{case_id}.ckpt.*")))


def _differences(model, x: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(finite, max |Δ|, mean |Δ|) of ``model`` (a descriptor or its module) in ``dtype`` vs fp32."""
    reference = model(x)
    low = model.to(dtype)(x.to(dtype)).float()
    model.to(torch.float32)
    diff = (low - reference).abs()
    return bool(torch.isfinite(low).all()), diff.max().item(), diff.mean().item()


def _far_off(low: torch.Tensor, reference: torch.Tensor, limit: float) -> bool:
    """Not finite, or further than ``limit`` from the fp32 reference somewhere."""
    return not bool(torch.isfinite(low).all()) or (low - reference).abs().max().item() > limit


@pytest.mark.parametrize("case_id", SAFE)
def test_claimed_precisions_hold(case_id, device) -> None:
    descriptor = _load(case_id).to(device)
    x = torch.rand(1, 3, 17, 19, generator=torch.Generator().manual_seed(3)).to(device)
    assert descriptor.supports_half and descriptor.supports_bfloat16

    finite, worst, _ = _differences(descriptor, x, torch.float16)
    assert finite and worst <= FP16_MAX

    finite, worst, mean = _differences(descriptor, x, torch.bfloat16)
    assert finite and worst <= BF16_MAX and mean <= BF16_MEAN


def test_lte_refuses_reduced_precision_for_a_measured_reason() -> None:
    descriptor = _load("lte_esc")
    assert not descriptor.supports_half and not descriptor.supports_bfloat16
    module = descriptor.model.eval()
    x = torch.rand(1, 3, 10, 11, generator=torch.Generator().manual_seed(3))
    reference = module.upscale_by(x, 4).clamp(0, 1)
    half = module.half().upscale_by(x.half(), 4).float().clamp(0, 1)
    module.float()
    # NaN, or far off: the decoder's coordinates and areas need fp32.
    assert _far_off(half, reference, FP16_MAX)
