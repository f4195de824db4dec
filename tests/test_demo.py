"""``esc-sr demo``: end to end on small random models, plus the pieces it is built from.

The resampling and PSNR claims are checked against BasicSR's own implementations (its port of
MATLAB ``imresize`` and its ``calculate_psnr``), the references the SR literature uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import esc_arch
import esc_sr
from esc_sr import cli, demo, hub
from esc_sr.images import read_image
from golden import GOLDEN_DIR  # noqa: E402

GOLDEN = GOLDEN_DIR


@pytest.fixture(scope="module")
def tiny_x4(tmp_path_factory) -> Path:
    """A small random ESC x4 checkpoint written by esc_sr.save_model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_x4.safetensors"
    esc_sr.save_model(esc_arch.esc_tiny(scale=4), path)
    return path


@pytest.fixture(scope="module")
def tiny_x2(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "tiny_x2.safetensors"
    esc_sr.save_model(esc_arch.esc_tiny(scale=2), path)
    return path


def _run_cli(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_sample_image_is_shipped_with_its_licence_note():
    assert demo.SAMPLE_IMAGE.is_file()
    assert demo.SAMPLE_IMAGE.stat().st_size < 200_000
    note = (demo.SAMPLE_IMAGE.parent / "README.md").read_text()
    assert demo.SAMPLE_IMAGE.name in note and "CC0" in note


def test_demo_cli_end_to_end_writes_the_comparison_and_prints_where(tiny_x4, tmp_path, capsys):
    out = tmp_path / "demo"
    assert _run_cli(["demo", "--out", str(out), "--model", str(tiny_x4)]) == 0

    printed = capsys.readouterr().out
    comparison = out / "comparison.png"
    assert f"wrote comparison: {comparison.resolve()}" in printed
    assert "PSNR (Y, crop 4), clean input:" in printed and "PSNR (Y, crop 4), jpeg_q40 input:" in printed
    # Only the four results: no temporary files of the atomic writes are left behind.
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "esc_x4.png", "lr.png", "lr_jpeg_q40.jpg"]

    hr = _png(demo.SAMPLE_IMAGE)  # 256x320, already a multiple of 4
    lr, sr, board = _png(out / "lr.png"), _png(out / "esc_x4.png"), _png(comparison)
    assert lr.shape == (64, 80, 3) and sr.shape == hr.shape
    # Four HR-sized panels side by side, captions below.
    assert board.shape[1] == 4 * hr.shape[1] + 5 * 8
    assert board.shape[0] > 2 * hr.shape[0]  # two rows: the clean input, then the JPEG one
    # The HR panel shows the sample itself, pixel for pixel; the ESC panel the written ESC output.
    panel_top = next(r for r in range(board.shape[0]) if np.array_equal(board[r, 8 + 3 * (320 + 8):][:320], hr[0]))
    assert np.array_equal(board[panel_top:panel_top + 256, 8 + 3 * 328: 8 + 3 * 328 + 320], hr)
    assert np.array_equal(board[panel_top:panel_top + 256, 8 + 2 * 328: 8 + 2 * 328 + 320], sr)


def test_demo_output_is_the_engine_output_and_psnr_is_recomputable(tiny_x4, tmp_path):
    result = demo.run_demo(tmp_path, model=str(tiny_x4))

    hr = _png(demo.SAMPLE_IMAGE)
    lr = _png(result.lr_image)
    model = esc_arch.load_model(tiny_x4)
    expected = esc_sr.upscale(model, lr, precision="fp32")
    assert np.array_equal(_png(result.sr_image), expected)
    assert result.psnr["esc"] == pytest.approx(demo.psnr_y(expected, hr, crop_border=4))
    assert result.psnr["bicubic"] == pytest.approx(demo.psnr_y(demo.bicubic_resize(lr, (320, 256)), hr, crop_border=4))
    # Bicubic beats pixel replication on a photo: the baselines are what they claim to be.
    assert result.psnr["bicubic"] > result.psnr["nearest"] + 1.0


def test_demo_rerun_replaces_its_previous_results(tiny_x4, tiny_x2, tmp_path):
    first = demo.run_demo(tmp_path, model=str(tiny_x4))
    before = first.comparison.read_bytes()
    second = demo.run_demo(tmp_path, model=str(tiny_x2))
    assert second.comparison == first.comparison
    assert second.comparison.read_bytes() != before
    assert second.scale == 2 and second.sr_image.name == "esc_x2.png"


def test_demo_on_a_user_image_mod_crops_to_the_scale(tiny_x2, tmp_path):
    # A 16-bit grayscale PNG with an odd size: converted to 8-bit RGB and cropped to a multiple of 2.
    ramp = (np.linspace(0, 65535, 45 * 37).reshape(37, 45)).astype(np.uint16)
    source = tmp_path / "ramp16.png"
    import cv2

    assert cv2.imwrite(str(source), ramp)
    result = demo.run_demo(tmp_path / "out", model=str(tiny_x2), image=source)
    assert _png(result.sr_image).shape == (36, 44, 3)
    assert _png(result.lr_image).shape == (18, 22, 3)
    assert read_image(source).pixels.dtype == np.uint16  # the input is untouched


def test_large_user_image_is_shown_as_a_centre_crop(tiny_x4, tmp_path):
    rng = np.random.default_rng(0)
    big = (rng.random((520, 532, 3)) * 255).astype(np.uint8)
    source = tmp_path / "big.png"
    Image.fromarray(big).save(source)
    result = demo.run_demo(tmp_path / "out", model=str(tiny_x4), image=source)
    board = _png(result.comparison)
    assert board.shape[1] == 4 * 384 + 5 * 8  # panels are 384x384 centre crops
    assert _png(result.sr_image).shape == (520, 532, 3)  # the full result is still written


def test_demo_refuses_to_overwrite_its_input(tiny_x4, tmp_path):
    source = tmp_path / "comparison.png"
    shutil.copyfile(demo.SAMPLE_IMAGE, source)
    with pytest.raises(demo.DemoError, match="overwrite its own input"):
        demo.run_demo(tmp_path, model=str(tiny_x4), image=source)
    assert source.read_bytes() == demo.SAMPLE_IMAGE.read_bytes()


def test_demo_with_an_official_name_uses_the_weights_cache(tmp_path, monkeypatch):
    # A file placed by hand in the cache (the offline route) is found by its registry name;
    # the base URL points nowhere, so any network access would fail the test.
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(hub.BASE_URL_ENV, "http://127.0.0.1:9/unreachable")
    (tmp_path / "cache").mkdir()
    shutil.copyfile(GOLDEN / "esc_light_x2.ckpt.pth", tmp_path / "cache" / "ESC_light_X2.pth")
    small = tmp_path / "small.png"
    Image.fromarray(_png(demo.SAMPLE_IMAGE)[96:160, 128:192]).save(small)

    result = demo.run_demo(tmp_path / "out", model="esc_light_x2", image=small)

    assert result.model_label == "ESC_light_X2"
    assert result.scale == 2
    assert _png(result.sr_image).shape == (64, 64, 3)


def test_bad_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(hub.UnknownModelError, match=r"^model file not found: .*nope\.pth$"):
        demo.run_demo(tmp_path, model=str(tmp_path / "nope.pth"))


def test_bicubic_matches_basicsr_matlab_imresize_away_from_the_border():
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from basicsr.utils.matlab_functions import imresize

    hr = _png(demo.SAMPLE_IMAGE)
    reference = np.clip(imresize(hr.astype(np.float32) / 255.0, 1 / 4), 0, 1)
    reference_u8 = np.rint(reference * 255).astype(np.uint8)
    ours = demo.bicubic_resize(hr, (80, 64))
    assert ours.shape == reference_u8.shape
    interior = (slice(2, -2), slice(2, -2))
    assert np.array_equal(ours[interior], reference_u8[interior])
    # Upscaling, too (MATLAB's cubic kernel without antialiasing).
    up_reference = np.rint(np.clip(imresize(ours.astype(np.float32) / 255.0, 4), 0, 1) * 255).astype(np.uint8)
    up = demo.bicubic_resize(ours, (320, 256))
    assert np.abs(up[8:-8, 8:-8].astype(int) - up_reference[8:-8, 8:-8]).max() <= 1


def test_psnr_y_matches_basicsr_calculate_psnr():
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    from basicsr.metrics import calculate_psnr

    hr = _png(demo.SAMPLE_IMAGE)
    rng = np.random.default_rng(0)
    noisy = np.clip(hr.astype(int) + rng.integers(-9, 10, hr.shape), 0, 255).astype(np.uint8)
    ours = demo.psnr_y(noisy, hr, crop_border=4)
    # BasicSR takes BGR images.
    theirs = calculate_psnr(noisy[..., ::-1], hr[..., ::-1], crop_border=4, test_y_channel=True)
    assert ours == pytest.approx(theirs, abs=1e-5)  # BasicSR computes Y in float32
    assert demo.psnr_y(hr, hr, crop_border=4) == float("inf")


def test_nearest_upscale_replicates_pixels():
    lr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(demo.nearest_upscale(lr, 4), lr.repeat(4, axis=0).repeat(4, axis=1))


def test_esc_sr_main_runs_the_demo_and_reports_errors_in_one_line(tiny_x4, tmp_path, capsys):
    from esc_sr.cli import main

    out = tmp_path / "via-main"
    assert main(["demo", "--out", str(out), "-m", str(tiny_x4)]) == 0
    assert f"wrote comparison: {(out / 'comparison.png').resolve()}" in capsys.readouterr().out

    source = out / "comparison.png"
    assert main(["demo", "--out", str(out), "-m", str(tiny_x4), "--image", str(source)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"esc-sr demo: error: {source}: the demo would overwrite its own input; choose another --out folder"]

    assert main(["demo", "--out", str(out), "-m", "ESC_DIV2K_X5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esc-sr demo: error: unknown model name: ESC_DIV2K_X5")


def _panel_columns(board: np.ndarray, panel: np.ndarray) -> list[int]:
    """The left edges of the panels of ``board`` that are ``panel``, pixel for pixel (any row)."""
    h, w = panel.shape[:2]
    found = []
    for left in range(8, board.shape[1] - w + 1, w + 8):
        for top in range(board.shape[0] - h + 1):
            if np.array_equal(board[top, left:left + w], panel[0]) and np.array_equal(board[top:top + h, left:left + w], panel):
                found.append(left)
                break
    return found


def test_demo_on_the_embedded_default_model_beats_bicubic(tmp_path):
    # The README's first command: no --model, no --image, no network.
    result = demo.run_demo(tmp_path)
    assert result.model_label == "embedded models: " + ", ".join(esc_arch.EMBEDDED_MODELS)
    assert result.scale == 4
    assert result.psnr["esc"] > result.psnr["bicubic"] + 0.3


def test_the_demo_shows_every_embedded_model_on_a_jpeg_input_beside_bicubic(tmp_path):
    """Without -m: both embedded models (esc_arch.EMBEDDED_MODELS), on the clean and on the JPEG q40 input,
    beside bicubic; the JPEG panels are each model's output for the JPEG file the demo wrote."""
    result = demo.run_demo(tmp_path)
    names = list(esc_arch.EMBEDDED_MODELS)
    assert len(names) >= 2 and result.models == [f"ESC {name}" for name in names]
    assert set(result.psnr_by_input) == {"clean", f"jpeg_q{demo.JPEG_QUALITY}"}
    for measured in result.psnr_by_input.values():
        assert set(measured) == {"nearest", "bicubic", *result.models}

    with Image.open(result.jpeg_image) as jpeg:
        assert jpeg.format == "JPEG"
        lr_jpeg = np.asarray(jpeg.convert("RGB"))
    assert not np.array_equal(lr_jpeg, _png(result.lr_image))  # degraded, not the clean input
    hr = _png(demo.SAMPLE_IMAGE)
    board = _png(result.comparison)
    assert board.shape[1] == (3 + len(names)) * (hr.shape[1] + 8) + 8  # LR | bicubic | each model | HR
    bicubic = demo.bicubic_resize(lr_jpeg, (hr.shape[1], hr.shape[0]))
    assert _panel_columns(board, bicubic) == [8 + hr.shape[1] + 8]
    for i, name in enumerate(names):
        sr = esc_sr.upscale(esc_arch.load_model(name), lr_jpeg, precision="fp32")
        assert _panel_columns(board, sr) == [8 + (2 + i) * (hr.shape[1] + 8)], name
        assert result.psnr_by_input[f"jpeg_q{demo.JPEG_QUALITY}"][f"ESC {name}"] == pytest.approx(
            demo.psnr_y(sr, hr, crop_border=4))


def test_the_demo_cli_prints_both_embedded_models(tmp_path, capsys):
    assert _run_cli(["demo", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    jpeg_line = next(line for line in printed.splitlines() if "jpeg_q40 input" in line)
    assert "bicubic" in jpeg_line and all(f"ESC {name}" in jpeg_line for name in esc_arch.EMBEDDED_MODELS)
