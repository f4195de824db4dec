"""The embedded real-world model ('real', esc_arch/weights/esc_real_x4.safetensors) is what its card says: an fp16
ESCRealM x4 file that loads by name, and whose margin over bicubic on degraded photos, measured here on inputs this
test builds, is the one its metadata claims (less a tolerance for the smaller sample)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

import esc_arch
import esc_sr
from benchmarks.degradations import degrade
from benchmarks.real_world import bicubic, score, top_left
from esc_arch.checkpoint import EMBEDDED_MODELS, read_checkpoint
from golden import DATA_DIR

FILE = EMBEDDED_MODELS["real"]
TOLERANCE_DB = 0.5  # the card's crops, degraded with other seeds


def _held_out_crops() -> list[np.ndarray]:
    """The card's HR images: the top-left 256x256 crops of the 20 photos the campaign holds out (every 14th of
    BSDS200 + SunHays80, sorted), read from ../shared here."""
    photos = sorted(p for folder in ("BSDS200", "SunHays80") for p in (DATA_DIR / "train" / folder).iterdir())
    crops = []
    for path in photos[13::14]:
        crops.append(top_left(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)))
    return crops


def test_the_real_model_loads_by_name_and_is_fp16():
    model = esc_arch.load_model("real")
    assert model.arch_name == "ESCRealM" and model.scale == 4
    with safe_open(str(FILE), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys() if handle.get_tensor(k).is_floating_point()} \
            == {torch.float16}


@pytest.mark.parametrize("kind", ["web", "clean"])
def test_its_margin_over_bicubic_is_the_one_its_card_claims(kind):
    card = read_checkpoint(FILE)[1]["description"]["quality"]
    claimed = card["real"][kind]["psnr"] - card["bicubic"][kind]["psnr"]
    model = esc_arch.load_model("real")
    margins = []
    for i, hr in enumerate(_held_out_crops()):
        lr = degrade(hr, kind, seed=90_000 + i)
        margins.append(score(esc_sr.upscale(model, lr), hr)[0] - score(bicubic(lr), hr)[0])
    assert float(np.mean(margins)) >= claimed - TOLERANCE_DB, (margins, claimed)
