"""Which embedded model ``esc-sr upscale`` uses without ``-m`` (esc_sr/model_choice.py), and ``esc-sr models``
listing the embedded models: the rule reads the measured table, the table is the measurement's file, and the
command line follows the rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import esc_arch
from esc_sr import cli, model_choice
from esc_sr.cli.models import format_embedded_table

REPO = Path(__file__).resolve().parents[1]


def test_the_table_is_the_measurement_and_covers_every_embedded_model():
    results = json.loads((REPO / model_choice.MEASUREMENT).read_text())["results"]
    assert set(model_choice.MEASURED) == set(esc_arch.EMBEDDED_MODELS)
    assert model_choice.INCUMBENT in esc_arch.EMBEDDED_MODELS
    rows = {row for rows in model_choice.FORMAT_ROWS.values() for row in rows}
    for name, measured in model_choice.MEASURED.items():
        assert set(measured) == rows
        for row, (psnr, ssim) in measured.items():
            assert (psnr, ssim) == (round(results[name][row]["psnr"], 2), round(results[name][row]["ssim"], 3)), (name, row)


def _table(real_web: float, real_camera: float, real_clean: float) -> dict:
    """A measured table where 'real' has these PSNRs (and SSIM above the incumbent's where its PSNR is)."""
    base = {"web": (26.0, 0.68), "camera": (27.0, 0.69), "clean": (29.0, 0.80)}
    real = {row: (psnr, base[row][1] + (0.01 if psnr > base[row][0] else -0.01))
            for row, psnr in zip(("web", "camera", "clean"), (real_web, real_camera, real_clean))}
    return {"default": base, "real": real}


def test_a_challenger_replaces_the_incumbent_only_where_it_wins_every_row():
    assert model_choice.rule(_table(25.0, 26.0, 28.0)) == {"jpeg": "default", "lossless": "default"}
    assert model_choice.rule(_table(26.5, 27.5, 28.0)) == {"jpeg": "real", "lossless": "default"}
    assert model_choice.rule(_table(26.5, 26.9, 28.0))["jpeg"] == "default"  # loses the camera row
    assert model_choice.rule(_table(25.0, 26.0, 29.5)) == {"jpeg": "default", "lossless": "real"}
    tied_ssim = _table(26.5, 27.5, 28.0)
    tied_ssim["real"]["web"] = (26.5, tied_ssim["default"]["web"][1])
    assert model_choice.rule(tied_ssim)["jpeg"] == "default"  # PSNR and SSIM must both be better


def _images(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    pixels = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"jpeg": folder / "a.jpg", "png": folder / "b.png", "jpeg_named_png": folder / "c.png"}
    Image.fromarray(pixels).save(paths["jpeg"], quality=40)
    Image.fromarray(pixels).save(paths["png"])
    Image.fromarray(pixels).save(paths["jpeg_named_png"], format="JPEG", quality=40)
    return paths


def test_the_format_is_the_files_bytes_not_its_name(tmp_path):
    paths = _images(tmp_path)
    assert model_choice.input_format(paths["jpeg"]) == "jpeg"
    assert model_choice.input_format(paths["jpeg_named_png"]) == "jpeg"
    assert model_choice.input_format(paths["png"]) == "lossless"
    assert model_choice.input_format(tmp_path / "missing.jpg") == "lossless"


def test_a_batch_takes_the_choice_of_most_of_its_files(tmp_path, monkeypatch):
    paths = _images(tmp_path)
    monkeypatch.setattr(model_choice, "MEASURED", _table(26.5, 27.5, 28.0))  # real for JPEGs, default otherwise
    assert model_choice.choose_embedded_model(paths["jpeg"]) == "real"
    assert model_choice.choose_embedded_model(paths["png"]) == "default"
    assert model_choice.choose_for_batch([paths["jpeg"], paths["jpeg_named_png"], paths["png"]]) == "real"
    assert model_choice.choose_for_batch([paths["jpeg"], paths["png"]]) == model_choice.INCUMBENT  # a tie
    assert model_choice.choose_for_batch([]) == model_choice.INCUMBENT


def test_the_measured_rule_today(tmp_path):
    """What the numbers say now: the incumbent for every format until another model beats it on every row."""
    paths = _images(tmp_path)
    for fmt, chosen in model_choice.rule().items():
        rows = model_choice.FORMAT_ROWS[fmt]
        if chosen != model_choice.INCUMBENT:
            assert all(model_choice.MEASURED[chosen][r] > model_choice.MEASURED[model_choice.INCUMBENT][r] for r in rows)
    assert model_choice.choose_embedded_model(paths["jpeg"]) == model_choice.rule()["jpeg"]
    assert model_choice.choose_embedded_model(paths["png"]) == model_choice.rule()["lossless"]


def _upscaled(tmp_path: Path, source: Path, *model: str) -> np.ndarray:
    out = tmp_path / f"out_{'_'.join(model) or 'none'}"
    assert cli.main(["upscale", str(source), "-o", str(out), "-q", "--threads", "1", *(("-m", *model) if model else ())]) == 0
    return np.asarray(Image.open(next(out.iterdir())))


@pytest.mark.parametrize("rule_picks", ["default", "real"])
def test_upscale_without_m_uses_the_model_the_rule_picks(tmp_path, monkeypatch, rule_picks):
    source = _images(tmp_path / "in")["jpeg"]
    web, camera = (26.5, 27.5) if rule_picks == "real" else (25.0, 26.0)
    monkeypatch.setattr(model_choice, "MEASURED", _table(web, camera, 28.0))
    assert model_choice.choose_embedded_model(source) == rule_picks
    np.testing.assert_array_equal(_upscaled(tmp_path, source), _upscaled(tmp_path, source, rule_picks))


def test_esc_sr_models_lists_every_embedded_model(capsys):
    assert cli.main(["models"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    for name in esc_arch.EMBEDDED_MODELS:
        row = next((line for line in lines if line.split()[:1] == [name]), None)
        assert row is not None, f"{name!r} is not listed:\n{printed}"
        model = esc_arch.load_model(name)
        assert model.arch_name in row.split() and f"x{model.scale}" in row.split()
        assert f"{esc_arch.count_parameters(model):,}" in row.split()
    assert "ESC_DIV2K_X4" in printed  # the official release follows
    for fmt, chosen in model_choice.rule().items():
        assert f"{fmt} inputs -> {chosen}" in format_embedded_table()
