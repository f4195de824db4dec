"""The embedded default model: what ships is what its model card says, measured again here."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

import esc_arch
from esc_arch.checkpoint import DEFAULT_MODEL_FILE, read_checkpoint
from golden import DATA_DIR

MODEL_CARD = DEFAULT_MODEL_FILE.with_name("README.md")


@pytest.fixture(scope="module")
def description() -> dict:
    return read_checkpoint(DEFAULT_MODEL_FILE)[1]["description"]


def test_the_shipped_file_is_an_fp16_esc_tiny():
    with safe_open(str(DEFAULT_MODEL_FILE), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    model = esc_arch.load_model("default")
    assert (model.arch_name, model.scale, esc_arch.match_preset(model)) == ("ESC", 4, "esc_tiny")
    assert model(torch.rand(1, 3, 20, 20)).shape == (1, 3, 80, 80)


def test_the_model_card_quotes_the_numbers_stored_in_the_file(description):
    card = MODEL_CARD.read_text(encoding="utf-8")
    for name in ("set5", "set14"):
        psnr = description["quality"][name]["psnr"]
        assert re.search(rf"\|\s*{name}\s*\|\s*\*\*{psnr:.2f}\*\*", card, re.IGNORECASE), (name, psnr)
    assert f"{description['iterations']:,}" in card


def test_it_beats_bicubic_on_set5_by_the_margin_its_card_claims(description):
    from basicsr_plugin.evaluation import evaluate_folder

    claimed = description["quality"]["set5"]["psnr"] - description["quality"]["set5"]["bicubic_psnr"]
    measured = evaluate_folder(esc_arch.load_model("default"), DATA_DIR / "benchmark" / "Set5", scale=4)
    assert measured["psnr"] - measured["bicubic_psnr"] >= claimed - 0.05
    assert claimed > 0.5  # a model that is not better than bicubic must not ship
