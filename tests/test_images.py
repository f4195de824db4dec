"""Image files as users have them: every layout and bit depth in, faithful files out, atomic writes.

Every test writes real files into a temporary folder (with encoders other than the one under test
where possible: OpenCV writes what Pillow reads and vice versa) and reads them back.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import esc_arch
from esc_sr import images
from esc_sr.engine import upscale

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1).eval()


@pytest.fixture(scope="module")
def nearest_model():
    """An ESC whose learned head is zero: its output is exactly the nearest-neighbour upscale."""
    model = esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1).eval()
    torch.nn.init.zeros_(model.to_img.weight)
    torch.nn.init.zeros_(model.to_img.bias)
    return model


def _gradient(h: int, w: int, channels: int, dtype=np.uint8) -> np.ndarray:
    """A smooth, asymmetric test picture (so rotations and channel swaps are visible)."""
    top = 255 if dtype == np.uint8 else 65535
    y, x = np.mgrid[0:h, 0:w]
    planes = [x / max(w - 1, 1), y / max(h - 1, 1), (x + 2 * y) / (w + 2 * h), 0.25 + 0.5 * (x > w // 2)]
    stack = np.stack(planes[:channels], -1) if channels > 1 else planes[0]
    return np.rint(stack * top).astype(dtype)


# ------------------------------------------------------------------------------------- layouts in


def test_rgb_png_written_by_opencv_reads_as_rgb_not_bgr(tmp_path):
    rgb = _gradient(12, 17, 3)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[:, :, ::-1])  # OpenCV files are BGR on the API side
    image = images.read_image(tmp_path / "a.png")
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (12, 17, 3)
    np.testing.assert_array_equal(image.pixels, rgb)
    assert image.format == "PNG" and not image.has_alpha and image.bit_depth == 8


def test_grayscale_stays_gray_through_upscale_and_write(tmp_path, tiny_model):
    PILImage.fromarray(_gradient(10, 14, 1)).save(tmp_path / "g.png")
    image = images.read_image(tmp_path / "g.png")
    assert image.pixels.shape == (10, 14)
    out = upscale(tiny_model, image.pixels)
    assert out.shape == (20, 28) and out.dtype == np.uint8
    images.write_image(tmp_path / "g_x2.png", out)
    with PILImage.open(tmp_path / "g_x2.png") as written:
        assert written.mode == "L" and written.size == (28, 20)
        np.testing.assert_array_equal(np.asarray(written), out)


def test_rgba_alpha_is_upscaled_separately_and_kept(tmp_path, nearest_model):
    rgba = _gradient(32, 32, 4)
    rgba[:, :, 3] = 0
    rgba[4:28, 4:28, 3] = 255  # an opaque square on a transparent background
    rgba[6:8, 6:8, 3] = 100  # with a half-transparent hole
    PILImage.fromarray(rgba).save(tmp_path / "a.png")
    image = images.read_image(tmp_path / "a.png")
    assert image.has_alpha and image.pixels.shape == (32, 32, 4)

    nearest = rgba.repeat(2, axis=0).repeat(2, axis=1)
    # alpha='model': the alpha plane goes through the model like a gray image (here: nearest).
    out = upscale(nearest_model, image.pixels, alpha="model")
    assert out.shape == (64, 64, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, nearest)  # colour and alpha, each upscaled on its own
    # alpha='resize': Lanczos; flat regions keep their values, edges are smooth.
    resized = upscale(nearest_model, image.pixels, alpha="resize")
    np.testing.assert_array_equal(resized[:, :, :3], nearest[:, :, :3])
    alpha = resized[:, :, 3].astype(int)
    assert alpha[:4, :4].max() == 0 and alpha[28:36, 28:36].min() == 255 and alpha[12:16, 12:16].min() < 150  # the hole survives, smoothed
    images.write_image(tmp_path / "a_x2.png", out)
    np.testing.assert_array_equal(images.read_image(tmp_path / "a_x2.png").pixels, out)


def test_fully_opaque_alpha_stays_exactly_opaque(tiny_model):
    rgba = _gradient(8, 8, 4)
    rgba[:, :, 3] = 255
    out = upscale(tiny_model, rgba)
    assert (out[:, :, 3] == 255).all()


def test_gray_with_alpha(tmp_path, tiny_model):
    la = np.stack([_gradient(9, 11, 1), np.full((9, 11), 128, np.uint8)], -1)
    PILImage.fromarray(la).save(tmp_path / "la.png")
    image = images.read_image(tmp_path / "la.png")
    assert image.pixels.shape == (9, 11, 2)
    out = upscale(tiny_model, image.pixels)
    assert out.shape == (18, 22, 2)
    images.write_image(tmp_path / "la_x2.png", out)  # stored as RGBA with equal colour channels
    back = images.read_image(tmp_path / "la_x2.png").pixels
    np.testing.assert_array_equal(back[:, :, 0], out[:, :, 0])
    np.testing.assert_array_equal(back[:, :, 3], out[:, :, 1])


@pytest.mark.parametrize("ext", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_files_stay_16_bit(tmp_path, tiny_model, ext, channels):
    pixels = _gradient(10, 13, channels, np.uint16)
    pixels[0, 0] = 1  # a value that does not survive a round trip through 8 bits
    bgr = pixels if channels == 1 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA)
    cv2.imwrite(str(tmp_path / f"in{ext}"), bgr)

    image = images.read_image(tmp_path / f"in{ext}")
    assert image.pixels.dtype == np.uint16 and image.bit_depth == 16
    np.testing.assert_array_equal(image.pixels, pixels)

    out = upscale(tiny_model, image.pixels)
    assert out.dtype == np.uint16
    images.write_image(tmp_path / f"out{ext}", out)
    written = cv2.imread(str(tmp_path / f"out{ext}"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint16 and written.shape[:2] == (20, 26)
    np.testing.assert_array_equal(images.read_image(tmp_path / f"out{ext}").pixels, out)
    # The output uses the 16-bit range (not 8-bit values scaled up).
    assert len(np.unique(out[..., 0] % 257)) > 1


def test_palette_images_become_rgb_or_rgba(tmp_path):
    rgb = _gradient(8, 8, 3)
    PILImage.fromarray(rgb).quantize(colors=16).save(tmp_path / "p.png")
    plain = images.read_image(tmp_path / "p.png").pixels
    assert plain.shape == (8, 8, 3) and plain.dtype == np.uint8
    with PILImage.open(tmp_path / "p.png") as pil:
        np.testing.assert_array_equal(plain, np.asarray(pil.convert("RGB")))

    paletted = PILImage.fromarray(rgb).quantize(colors=16)
    paletted.info["transparency"] = 0
    paletted.save(tmp_path / "pt.png", transparency=0)
    with_alpha = images.read_image(tmp_path / "pt.png").pixels
    assert with_alpha.shape == (8, 8, 4)
    assert set(np.unique(with_alpha[:, :, 3])) <= {0, 255} and (with_alpha[:, :, 3] == 0).any()

    PILImage.fromarray(rgb).quantize(colors=8).save(tmp_path / "p.gif")
    assert images.read_image(tmp_path / "p.gif").pixels.shape == (8, 8, 3)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = _gradient(16, 16, 3)
    cmyk = PILImage.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    image = images.read_image(tmp_path / "c.jpg")
    assert image.pixels.shape == (16, 16, 3) and image.format == "JPEG"
    assert image.icc_profile is None  # a CMYK profile no longer describes RGB pixels
    with PILImage.open(tmp_path / "c.jpg") as pil:
        assert pil.mode == "CMYK"
        np.testing.assert_array_equal(image.pixels, np.asarray(pil.convert("RGB")))
    assert np.abs(image.pixels.astype(int) - rgb.astype(int)).mean() < 8


def _with_orientation(orientation: int) -> PILImage.Exif:
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation, expected", [(3, "rot180"), (6, "rot90cw"), (8, "rot90ccw")])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, expected):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored in the file
    stored[:, 20:] = (0, 0, 255)
    PILImage.fromarray(stored).save(tmp_path / "r.jpg", exif=_with_orientation(orientation), quality=98)
    pixels = images.read_image(tmp_path / "r.jpg").pixels
    upright = {"rot180": np.rot90(stored, 2), "rot90cw": np.rot90(stored, -1), "rot90ccw": np.rot90(stored, 1)}[expected]
    assert pixels.shape == upright.shape
    difference = np.abs(pixels.astype(int) - upright.astype(int))
    assert difference.mean() < 6  # JPEG noise (chroma subsampling blurs the red/blue edge)
    for corner in ((1, 1), (1, -2), (-2, 1), (-2, -2)):  # every corner has the upright colour
        assert difference[corner].max() < 30, corner


def _add_png_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    end_of_ihdr = 8 + 25  # signature + IHDR chunk
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def test_exif_orientation_applies_to_16_bit_png_too(tmp_path):
    pixels = _gradient(6, 10, 3, np.uint16)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    assert ok
    exif = _with_orientation(6).tobytes()
    (tmp_path / "r16.png").write_bytes(_add_png_chunk(encoded.tobytes(), b"eXIf", exif[6:] if exif.startswith(b"Exif") else exif))
    image = images.read_image(tmp_path / "r16.png")
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels, np.rot90(pixels, -1))


def test_float_tiff_reads_as_float32(tmp_path):
    values = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    PILImage.fromarray(values).save(tmp_path / "f.tif")
    image = images.read_image(tmp_path / "f.tif")
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, values)


def test_webp_jpeg_bmp_outputs_are_8_bit(tmp_path):
    rgb16 = _gradient(8, 8, 3, np.uint16)
    for ext in (".jpg", ".webp", ".bmp"):
        images.write_image(tmp_path / f"o{ext}", rgb16)
        back = images.read_image(tmp_path / f"o{ext}").pixels
        assert back.dtype == np.uint8 and back.shape == (8, 8, 3)


def test_jpeg_cannot_silently_drop_alpha(tmp_path):
    with pytest.raises(images.ImageWriteError, match=r"o\.jpg: .*alpha"):
        images.write_image(tmp_path / "o.jpg", _gradient(4, 4, 4))
    assert not (tmp_path / "o.jpg").exists()
    with pytest.raises(images.ImageWriteError, match="cannot write '.xyz'"):
        images.write_image(tmp_path / "o.xyz", _gradient(4, 4, 3))


# ------------------------------------------------------------------------------------- bad inputs


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    PILImage.fromarray(_gradient(64, 64, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder.png").mkdir()

    cases = {
        "empty.png": "empty file (0 bytes)",
        "text.png": "not a recognised image format",
        "truncated.png": "corrupt or truncated image data",
        "missing.png": "no such file",
        "folder.png": "is a directory",
    }
    for name, reason in cases.items():
        with pytest.raises(images.ImageReadError) as info:
            images.read_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)) and reason in message, message
        assert "\n" not in message


# ---------------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old contents")

    def crash(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", crash)
    with pytest.raises(images.ImageWriteError, match="No space left on device"):
        images.write_image(target, _gradient(32, 32, 3))
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_into_a_new_name_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(images.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        images.write_image(tmp_path / "new.png", _gradient(8, 8, 3))
    assert list(tmp_path.iterdir()) == []


def test_process_killed_mid_write_never_leaves_a_truncated_destination(tmp_path):
    """A real crash: the writer is SIGKILLed while the bytes are going to disk."""
    target = tmp_path / "photo.png"
    target.write_bytes(b"previous version")
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import os, time, numpy as np
        from esc_sr import images
        real_write = os.write

        class SlowFile:  # write half the bytes, then hang until killed
            def __init__(self, handle): self.handle = handle
            def write(self, data):
                self.handle.write(data[: len(data) // 2]); self.handle.flush()
                open({str(ready)!r}, "w").close()
                time.sleep(60)
            def __getattr__(self, name): return getattr(self.handle, name)
            def __enter__(self): return self
            def __exit__(self, *exc): return self.handle.__exit__(*exc)

        import builtins
        from esc_sr import atomic
        real_open = builtins.open
        def slow_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return SlowFile(handle) if mode == "wb" else handle
        atomic.open = slow_open  # the module-level name shadows the builtin inside esc_sr.atomic
        images.write_image({str(target)!r}, (np.random.rand(256, 256, 3) * 255).astype(np.uint8))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "writer exited before the simulated crash"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"previous version"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("photo.png", "ready")]
    assert all(name.startswith(images.TEMP_PREFIX) for name in leftovers), leftovers
    assert leftovers, "the half-written bytes should have been in a temporary file"


# ------------------------------------------------------------------------------------- resizing


def test_resize_uses_width_height_order_and_stays_in_range():
    values = images.to_float(_gradient(10, 20, 3))
    out = images.resize(values, (7, 5))
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    gray = images.resize(values[:, :, 0], (7, 5))
    assert gray.shape == (5, 7)


def test_pil_round_trip_of_modes():
    for mode, shape in (("L", (6, 5)), ("LA", (6, 5, 2)), ("RGB", (6, 5, 3)), ("RGBA", (6, 5, 4))):
        pil = PILImage.new(mode, (5, 6))
        array = images.pil_to_array(pil)
        assert array.shape == shape
        assert images.array_to_pil(array).mode == mode
    buffer = io.BytesIO()
    PILImage.new("1", (4, 4)).save(buffer, format="PNG")
    assert images.pil_to_array(PILImage.open(buffer)).dtype == np.uint8


def test_images_above_pillows_decompression_bomb_limit_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # as if the file had ~180 megapixels
    PILImage.fromarray(_gradient(20, 30, 3)).save(tmp_path / "large.png")
    assert images.read_image(tmp_path / "large.png").pixels.shape == (20, 30, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 100  # the caller's setting is restored
