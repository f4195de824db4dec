"""Hostile and broken inputs (issue 12): sizes are checked before memory is spent, nothing is silently ruined,
one file's failure is that file's alone, and every message is one line with the right reason.

Every hostile file is built here. Cases that would allocate gigabytes if a check regressed run in a subprocess
whose address space is capped (tests/hostile_runner.py): a regression fails there instead of eating the machine.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import save_file

import esc_arch
import esc_sr
from esc_arch import CheckpointError, inputs
from esc_sr.atomic import TEMP_PREFIX
from esc_arch.errors import printable
from esc_sr import cli, engine, images
from esc_sr.engine import EngineError, OutOfMemory, upscale

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("hostile_runner.py")


def tiny(**kw) -> esc_arch.ESC:
    torch.manual_seed(0)
    return esc_arch.esc_tiny(2, **{**dict(dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1), **kw}).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def model_file(work) -> Path:
    return esc_sr.save_model(tiny(), work / "tiny_x2.safetensors")


@pytest.fixture(scope="module")
def pth_file(work) -> Path:
    path = work / "tiny_x2.pth"
    torch.save({"params_ema": tiny().state_dict()}, path)
    return path


def _photo(h: int, w: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(h * w + channels)
    return (rng.random((h, w, channels) if channels > 1 else (h, w)) * 255).astype(np.uint8)


def _png_header(width: int, height: int, *, rows: int = 4, colour: int = 2) -> bytes:
    """A valid PNG signature, IHDR and IEND declaring ``width x height`` with only ``rows`` rows of (zero) data:
    small on disk, huge when decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    row = b"\x00" * (1 + width * 3)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * rows, 9)) + chunk(b"IEND", b"")


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def run_capped(work: Path, cases: list[dict], *, headroom_mb: int = 512, timeout: int = 600) -> dict:
    """Run ``cases`` in tests/hostile_runner.py under an address-space cap; their results by name."""
    spec = work / f"cases_{cases[0]['name']}.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(headroom_mb)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def one_line(message: str) -> bool:
    return "\n" not in message and "\x1b" not in message and "\r" not in message


# =============================================================================== checkpoints: declared sizes


def _hostile_checkpoints(work: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its refusal must contain)."""
    base = tiny().state_dict()
    files: dict[str, tuple[Path, str]] = {}

    huge_index = dict(base)
    huge_index["blocks.99999999.ln_proj.weight"] = torch.zeros(16)
    files["huge block index"] = (_save(huge_index, work / "huge_index.pth"), "not 0..n-1")

    many_blocks = dict(base)  # blocks 1..399 each hold one tiny tensor: 400 blocks would be built
    many_blocks.update({f"blocks.{i}.ln_proj.weight": torch.zeros(16) for i in range(1, 400)})
    files["blocks without their tensors"] = (_save(many_blocks, work / "many_blocks.pth"), "has 400 entries but only")

    expanded = dict(base)
    expanded["blocks.0.attn.to_qkv.weight"] = torch.zeros(1).expand(96, 2048, 1, 1)
    files["stride-0 expand"] = (_save(expanded, work / "expanded.pth"), "an expanded or overlapping view")

    expanded_huge = dict(base)
    expanded_huge["blocks.0.attn.to_qkv.weight"] = torch.zeros(1).expand(48, 10_000_000, 1, 1)
    files["stride-0 expand to 1e7"] = (_save(expanded_huge, work / "expanded_huge.pth"), "an expanded or overlapping view")

    # A deflate-compressed zip .pth: a small file with a record that expands to 1 GiB of zeros.
    bomb = work / "deflate.pth"
    plain = _save({"params": base}, work / "deflate_src.pth")
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for record in src.infolist():
            dst.writestr(record.filename, src.read(record))
        folder = src.infolist()[0].filename.split("/")[0]
        with dst.open(f"{folder}/data/999", "w", force_zip64=True) as out:
            zeros = bytes(1 << 22)
            for _ in range(256):
                out.write(zeros)
    plain.unlink()
    files["deflate zip"] = (bomb, "is compressed")

    # A safetensors file whose 8-byte header length claims 1 TB.
    header = work / "header.safetensors"
    header.write_bytes((10**12).to_bytes(8, "little") + b'{"a": {}}')
    files["safetensors header length"] = (header, "header declares")

    # A safetensors header whose one tensor claims 1e12 values (the data is not there).
    shape_lie = work / "shape_lie.safetensors"
    meta = json.dumps({"x": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4]}}).encode()
    shape_lie.write_bytes(len(meta).to_bytes(8, "little") + meta + b"\0\0\0\0")
    files["safetensors shape lie"] = (shape_lie, "corrupt or truncated safetensors")

    sparse = dict(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that sparse tensors are in beta
        sparse["blocks.0.attn.to_qkv.weight"] = torch.sparse_coo_tensor(
            torch.zeros(4, 1, dtype=torch.long), torch.ones(1), (100000, 100000, 1, 1))
    files["sparse tensor"] = (_save(sparse, work / "sparse.pth"), "sparse")

    window = dict(base)  # a stored window of 500: 8 MB of bias table, but a 500 GB bias in every forward pass
    window["blocks.0.attn.relative_position_bias"] = torch.zeros(2, (2 * 500 - 1) ** 2)
    files["huge attention window"] = (_save(window, work / "window.pth"), "attention bias in every forward pass")

    wide = dict(base)  # a real, stored 100000-wide qkv: the model it asks for is sized before it is built
    wide["blocks.0.attn.to_qkv.weight"] = torch.zeros(48, 100_000, 1, 1)
    files["stored wide tensor"] = (_save(wide, work / "wide.pth"), "would have")
    return files


def test_hostile_checkpoints_are_refused_before_allocating(work):
    files = _hostile_checkpoints(work)
    cases = [{"name": name, "kind": "load", "path": str(path)} for name, (path, _) in files.items()]
    results = run_capped(work, cases)
    for name, (path, phrase) in files.items():
        result = results[name]
        assert result["outcome"] == "CheckpointError", (name, result)
        assert phrase in result["message"] and str(path) in result["message"], (name, result["message"])
        assert one_line(result["message"])
        assert result["peak_mb"] < 100, (name, result)
    assert files["deflate zip"][0].stat().st_size < 2_000_000


def test_limits_are_raised_by_max_parameters(tmp_path, model_file):
    values = sum(t.numel() for t in tiny().state_dict().values())
    with pytest.raises(CheckpointError, match=rf"holds {values:,} values, above the limit of {values - 1:,} parameters"
                                               r".*max_parameters=N.*--max-parameters"):
        esc_arch.load_model(model_file, max_parameters=values - 1)
    assert esc_arch.load_model(model_file, max_parameters=values).hyperparameters["dim"] == 16
    # The model built from the checkpoint is checked too (here made larger by an override), before it is built.
    with pytest.raises(CheckpointError, match=r"would have [\d,]+ parameters, above the limit of 1,000,000"):
        esc_arch.load_model(model_file, max_parameters=1_000_000, dim=1024, pdim=256)
    # ... and with what fuse() will bake (300 blocks of 64 MiB attention biases), before any key is compared.
    with pytest.raises(CheckpointError, match=r"would need .* GB ready for inference"):
        esc_arch.checkpoint.build_model(esc_arch.ESC, dict(dim=16, pdim=4, n_blocks=300, conv_blocks=1, window_size=32,
                                                num_heads=16), {})
    with pytest.raises(ValueError, match="positive integer"):
        esc_arch.load_model(model_file, max_parameters=0)


def test_too_many_tensors(tmp_path):
    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(1) for i in range(8193)}, str(path))
    with pytest.raises(CheckpointError, match=r"holds 8,193 tensors, above the limit of 8,192"):
        esc_arch.load_model(path)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    state = tiny().state_dict()
    state["blocks.0.attn.to_out.weight"][0, 0] = float("nan")
    state["blocks.0.attn.to_out.weight"][1, 0] = float("inf")
    for path in (_save(state, tmp_path / "nan.pth"), tmp_path / "nan.safetensors"):
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        with pytest.raises(CheckpointError, match=r"tensor blocks.0.attn.to_out.weight holds 2 non-finite values"):
            esc_arch.load_model(path)
    with pytest.raises(CheckpointError, match="non-finite"):
        esc_arch.load_model(state)  # an in-memory state dict gets the same checks


@pytest.mark.parametrize("mutate, phrase", [
    (lambda s: {0: torch.zeros(1)}, "filed under int 0, not a name"),
    (lambda s: {**s, "blocks.0.attn.to_qkv.weight": torch.zeros(0, 0, 1, 1)}, "malformed ESC checkpoint"),
    (lambda s: {**s, "blocks.0.attn.relative_position_bias": torch.zeros(5)}, "malformed ESC checkpoint"),
    (lambda s: {**s, "plk_filter": torch.tensor(1.0)}, "malformed ESC checkpoint"),
])
def test_malformed_tensors_give_checkpoint_errors(tmp_path, mutate, phrase):
    path = _save(mutate(tiny().state_dict()), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        esc_arch.load_model(path)
    assert phrase in str(info.value) and str(path) in str(info.value) and one_line(str(info.value))


def test_malformed_safetensors_metadata_is_ignored(tmp_path):
    model = tiny()
    for value in ("[1, 2]", '{"arch": "ESC", "hyperparameters": [1]}', "[" * 100_000, "not json"):
        path = tmp_path / "meta.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"esc_sr": value})
        assert esc_arch.load_model(path).hyperparameters["dim"] == 16


def test_the_format_is_told_by_content_not_name(tmp_path, model_file, pth_file):
    as_pth = tmp_path / "really_safetensors.pth"
    as_pth.write_bytes(model_file.read_bytes())
    as_st = tmp_path / "really_zip.safetensors"
    as_st.write_bytes(pth_file.read_bytes())
    assert esc_arch.load_model(as_pth).hyperparameters["dim"] == 16
    with pytest.raises(CheckpointError, match="a PyTorch zip checkpoint, not a safetensors file: rename it to .pth"):
        esc_arch.load_model(as_st)
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny().state_dict(), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy format .* not read"):
        esc_arch.load_model(legacy)
    text = tmp_path / "page.pth"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not a checkpoint, or corrupt"):
        esc_arch.load_model(text)


def _permission_denied(monkeypatch):
    real = inputs.os.open

    def deny(path, flags, *args, **kwargs):
        if "locked" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(inputs.os, "open", deny)  # the tests may run as root, where chmod 000 does not deny


def test_checkpoint_files_get_the_right_reason(tmp_path, model_file, pth_file, monkeypatch):
    loop = tmp_path / "loop.pth"
    loop.symlink_to(loop)
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    for name, source in (("locked.safetensors", model_file), ("locked.pth", pth_file)):
        (tmp_path / name).write_bytes(source.read_bytes())
    _permission_denied(monkeypatch)
    cases = {
        tmp_path / "locked.safetensors": "permission denied",
        tmp_path / "locked.pth": "permission denied",
        loop: "symlink loop",
        fifo: "is a FIFO",
        Path("/dev/zero"): "is a character device",
        tmp_path / "missing.pth": "no such file",
    }
    for path, reason in cases.items():
        started = time.monotonic()
        with pytest.raises(CheckpointError) as info:
            esc_arch.load_model(path)
        assert reason in str(info.value) and str(path) in str(info.value), str(info.value)
        assert time.monotonic() - started < 5  # a FIFO is not waited on


def test_crc_catches_a_flipped_byte_in_a_zip_checkpoint(tmp_path, pth_file):
    data = bytearray(pth_file.read_bytes())
    with zipfile.ZipFile(pth_file) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("data/0"))
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    offset = record.header_offset + 30 + name_length + extra_length
    data[offset] ^= 0x40
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt or truncated checkpoint \(Bad CRC-32"):
        esc_arch.load_model(bad)


def test_spandrel_gets_the_same_checks(tmp_path):
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import esc_arch.spandrel as esc_spandrel

    state = tiny().state_dict()
    state["blocks.0.attn.to_qkv.weight"] = torch.zeros(1).expand(48, 2048, 1, 1)
    arch = next(s.architecture for s in esc_spandrel.ESC_REGISTRY if s.architecture.id == "ESC")
    with pytest.raises(ValueError, match="expanded or overlapping view"):
        arch.load(state)
    state = tiny().state_dict()
    state["blocks.0.attn.to_out.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        arch.load(state)


def test_fuzzed_checkpoints_only_ever_give_checkpoint_errors(work, model_file, pth_file):
    """Hundreds of random truncations and byte flips of a valid .pth and .safetensors, loaded under a capped
    address space: each one loads (a flip in the weights of a safetensors file, which has no checksum) or raises a
    one-line CheckpointError -- never another exception, never a few hundred MB."""
    cases = [
        {"name": "fuzz pth", "kind": "fuzz", "path": str(pth_file), "seed": 1, "count": 300, "scratch": str(work / "f.pth")},
        {"name": "fuzz safetensors", "kind": "fuzz", "path": str(model_file), "seed": 2, "count": 300,
         "scratch": str(work / "f.safetensors")},
    ]
    results = run_capped(work, cases, headroom_mb=400)
    for name in ("fuzz pth", "fuzz safetensors"):
        result = results[name]
        assert result["outcome"] == "fuzz", result
        assert result["others"] == [], (name, result["others"][:5])
        assert result["truncated_loaded"] == 0, result
        assert sum(result["counts"].values()) == 300 and result["counts"]["CheckpointError"] >= 150, result
        assert result["peak_mb"] < 200, result


# ======================================================================================= images: declared sizes


def test_hostile_images_are_refused_before_decoding(work, model_file):
    (work / "imgs").mkdir(exist_ok=True)
    bomb = work / "imgs" / "bomb_20000.png"
    bomb.write_bytes(_png_header(20000, 20000))
    header_only = work / "imgs" / "header_300000.png"
    header_only.write_bytes(_png_header(300000, 300000, rows=0))
    big = work / "big400"
    big.mkdir(exist_ok=True)
    PILImage.fromarray(_photo(400, 400)).save(big / "a_big.png")
    PILImage.fromarray(_photo(16, 16)).save(big / "b_small.png")
    out = work / "out_hostile"
    cases = [
        {"name": "read 300000^2", "kind": "read", "path": str(header_only)},
        {"name": "read /dev/zero", "kind": "read", "path": "/dev/zero"},
        {"name": "cli 20000^2", "kind": "cli",
         "argv": ["upscale", str(bomb), "-o", str(out / "a"), "-m", str(model_file), "-q", "--max-memory", "16G"]},
        {"name": "cli outscale 100", "kind": "cli",
         "argv": ["upscale", str(big), "-o", str(out / "b"), "-m", str(model_file), "-q", "--outscale", "100",
                  "--max-memory", "1G"]},
        {"name": "upscale outscale 300", "kind": "upscale", "shape": [400, 400, 3], "kwargs": {"outscale": 300}},
    ]
    results = run_capped(work, cases)

    r = results["read 300000^2"]  # with the default limit: the memory available now
    assert r["outcome"] == "ImageReadError" and "a 300000x300000 image (RGB) needs about" in r["message"], r
    assert "--max-memory" in r["message"] and r["peak_mb"] < 100, r
    assert results["read /dev/zero"]["outcome"] == "ImageReadError"
    assert "character device" in results["read /dev/zero"]["message"]

    r = results["cli 20000^2"]
    assert r["outcome"] == "exit" and r["code"] == 1, r
    line = next(x for x in r["stderr"].splitlines() if x.startswith(str(bomb)))
    assert "a 20000x20000 image upscaled x2 (to 40000x40000) needs about" in line and "--max-memory" in line, line
    assert "above 16.0 GB (the limit set)" in line and "refused before running the model" in line, line
    assert r["peak_mb"] < 100, r

    r = results["cli outscale 100"]  # the 400 px image is refused, the 16 px one is written, the summary printed
    assert r["outcome"] == "exit" and r["code"] == 1, r
    assert "a 400x400 image upscaled x100 (to 40000x40000) needs about" in r["stderr"], r["stderr"]
    assert "above 1.0 GB (the limit set)" in r["stderr"]
    assert "1 written, 1 failed" in r["stderr"], r["stderr"]
    assert images.read_image(out / "b" / "b_small_x100.png").pixels.shape == (1600, 1600, 3)

    r = results["upscale outscale 300"]
    assert r["outcome"] == "OutOfMemory" and "(the memory available now)" in r["message"] and r["peak_mb"] < 50, r


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, reason in ((fifo, "is a FIFO"), (tmp_path, "is a directory"), (Path("/dev/null"), "character device")):
        started = time.monotonic()
        with pytest.raises(images.ImageReadError, match=reason):
            images.read_image(path)
        with pytest.raises(images.ImageReadError, match=reason):
            images.probe_image(path)
        assert time.monotonic() - started < 5


def test_unreadable_image_says_permission_denied(tmp_path, monkeypatch):
    PILImage.fromarray(_photo(8, 8)).save(tmp_path / "locked.png")
    _permission_denied(monkeypatch)
    with pytest.raises(images.ImageReadError, match="locked.png: permission denied"):
        images.read_image(tmp_path / "locked.png")


def test_probe_reads_the_header_only(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(30000, 20000, rows=1))
    info = images.probe_image(path)
    assert (info.width, info.height, info.channels, info.bytes_per_sample, info.frames) == (30000, 20000, 3, 1, 1)
    assert info.decode_bytes >= 30000 * 20000 * 3
    with pytest.raises(images.ImageReadError, match=r"a 30000x20000 image \(RGB\) needs about .* above 1.0 MB"):
        images.read_image(path, max_memory=10**6)


def test_animated_images_are_refused_not_cut_to_one_frame(tmp_path):
    frames = [PILImage.fromarray(_photo(8, 8)), PILImage.fromarray(_photo(8, 8)[::-1])]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    for name in ("anim.gif", "anim.png"):
        with pytest.raises(images.ImageReadError, match=r"has 2 frames \(an animation or a multi-page file\)"):
            images.read_image(tmp_path / name)
    frames[0].save(tmp_path / "still.gif")
    assert images.read_image(tmp_path / "still.gif").pixels.shape == (8, 8, 3)


def test_quality_is_bounded(tmp_path):
    with pytest.raises(images.ImageWriteError, match="quality must be an integer from 0 to 100"):
        images.write_image(tmp_path / "o.jpg", _photo(4, 4), quality=1000)
    assert not (tmp_path / "o.jpg").exists()


# ================================================================================== non-finite values


def test_non_finite_input_pixels_are_replaced_with_a_warning():
    pixels = np.full((12, 12), 0.5, np.float32)
    pixels[0, 0], pixels[1, 1], pixels[2, 2] = np.nan, np.inf, -np.inf
    with pytest.warns(RuntimeWarning, match=r"3 non-finite pixel values \(NaN or Inf\); replaced: NaN and -Inf by 0, "
                                            r"\+Inf by 1"):
        out = upscale(tiny(), pixels)
    assert np.isfinite(out).all() and out.shape == (24, 24)
    tensor = torch.full((1, 3, 8, 8), 0.5)
    tensor[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 non-finite pixel value "):
        assert torch.isfinite(upscale(tiny(), tensor)).all()


def _overflowing_model() -> esc_arch.ESC:
    model = tiny()
    with torch.no_grad():
        model.to_img.weight.fill_(3e38)  # finite weights whose sums overflow float32
    return model


def test_a_non_finite_output_is_never_returned():
    with pytest.raises(EngineError, match=r"the model's output has [\d,]+ non-finite values .* no output is returned"):
        upscale(_overflowing_model(), np.full((8, 8, 3), 200, np.uint8))


def test_non_finite_pixels_are_never_written(tmp_path):
    pixels = np.zeros((4, 4, 3), np.float32)
    pixels[0, 0, 0] = np.nan
    for ext in (".tif", ".png", ".jpg"):
        with pytest.raises(images.ImageWriteError, match=r"1 non-finite values \(NaN or Inf\); nothing was written"):
            images.write_image(tmp_path / f"o{ext}", pixels)
    assert list(tmp_path.iterdir()) == []


def test_cli_nan_tiff_is_upscaled_with_a_one_line_warning_and_nan_model_fails_the_file(tmp_path, model_file, capsys):
    values = np.full((10, 10), 0.25, np.float32)
    values[3, 3] = np.nan
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(values).save(src / "nan.tif")
    PILImage.fromarray(_photo(10, 10)).save(src / "photo.png")
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "-m", str(model_file), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and warning[0].startswith(f"{src / 'nan.tif'}: warning: the image has 1 non-finite"), err
    assert np.isfinite(images.read_image(tmp_path / "out" / "nan_x2.tif").pixels).all()
    assert "RuntimeWarning" not in err and "2 written, 0 failed" in err

    overflowing = tmp_path / "overflow.safetensors"
    esc_sr.save_model(_overflowing_model(), overflowing)
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "out2"), "-m", str(overflowing), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "0 written, 2 failed" in err and "non-finite values" in err, err
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_engine_refuses_empty_images():
    model = tiny()
    with pytest.raises(EngineError, match=r"the batch is empty \(0 images\)"):
        upscale(model, torch.zeros(0, 3, 8, 8))
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((5, 0), np.uint8), torch.zeros(3, 0, 4)):
        with pytest.raises(EngineError, match="the image has no pixels"):
            upscale(model, empty)


def test_engine_memory_limit_is_explicit_and_raisable():
    model = tiny()
    need = engine.estimate_memory(64, 64, 3, model)
    with pytest.raises(OutOfMemory, match=r"a 64x64 image upscaled x2 \(to 128x128\) needs about .* \(the limit set\)"):
        upscale(model, np.zeros((64, 64, 3), np.uint8), max_memory=need - 1)
    assert upscale(model, np.zeros((64, 64, 3), np.uint8), max_memory=need).shape == (128, 128, 3)
    assert upscale(model, np.zeros((8, 8, 3), np.uint8), max_memory=None).shape == (16, 16, 3)
    with pytest.raises(OutOfMemory, match="a batch of 3 8x8 images"):
        upscale(model, torch.zeros(3, 3, 8, 8), max_memory=engine.estimate_memory(8, 8, 3, model) * 2)


def test_estimate_covers_what_an_upscale_really_uses(tmp_path):
    """The estimate is an upper bound of the process's peak growth for an image large enough to dominate."""
    script = textwrap.dedent("""
        import resource, numpy as np, torch, esc_arch
        from esc_sr import engine
        torch.set_num_threads(1)
        model = esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1).eval()
        engine.upscale(model, np.zeros((16, 16, 3), np.uint8), tile=64)
        x = (np.random.rand(600, 800, 3) * 255).astype(np.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        engine.upscale(model, x, outscale=3, tile=64)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before, engine.estimate_memory(600, 800, 3, model, outscale=3))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grown, estimate = map(int, proc.stdout.split())
    assert grown < estimate, (grown, estimate)


# ============================================================================ the batch always finishes


@pytest.fixture
def two_images(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(_photo(12, 16)).save(src / "a.png")
    PILImage.fromarray(_photo(12, 16)).save(src / "b.png")
    return src


def test_a_failing_resize_fails_that_file_only(two_images, tmp_path, model_file, monkeypatch, capsys):
    real, calls = images.resize, []

    def flaky(values, size):
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("chainner-ext: allocation failed")
        return real(values, size)

    monkeypatch.setattr(images, "resize", flaky)
    code = cli.main(["upscale", str(two_images), "-o", str(tmp_path / "out"), "-m", str(model_file), "-q", "-s", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "1 written, 1 failed" in err, err
    assert f"{two_images / 'a.png'}: internal error" not in err
    assert f"{two_images / 'a.png'}: RuntimeError: chainner-ext: allocation failed" in err
    assert (tmp_path / "out" / "b_x3.png").is_file()


def test_a_failing_write_fails_that_file_only(tmp_path, model_file, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    PILImage.fromarray(_photo(8, 8)).save(src / "top.png")
    PILImage.fromarray(_photo(8, 8)).save(src / "sub" / "deep.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the sub-folder should go")
    code = cli.main(["upscale", str(src), "-r", "-o", str(out), "-m", str(model_file), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "1 written, 1 failed" in err, err
    assert "output " in err and "cannot create its folder" in err
    assert (out / "top_x2.png").is_file()


def test_output_that_is_a_file_is_a_usage_error_before_the_model_loads(two_images, tmp_path, capsys):
    blocker = tmp_path / "out.txt"
    blocker.write_text("x")
    code = cli.main(["upscale", str(two_images), "-o", str(blocker), "-m", str(tmp_path / "no_model.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "exists and is not a folder" in err and "no_model" not in err, err


def test_suffix_cannot_leave_the_output_folder(two_images, tmp_path, model_file, capsys):
    for suffix in ("/../../x", "_x2/..", "..\\x" if os.sep == "\\" else "a/b"):
        code = cli.main(["upscale", str(two_images), "-o", str(tmp_path / "out"), "-m", str(model_file),
                         f"--suffix={suffix}"])
        err = capsys.readouterr().err
        assert code == 2 and "contains a path separator" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.png").exists()


def test_bad_option_values(two_images, tmp_path, model_file, capsys):
    for bad in (["--quality", "1000"], ["--quality", "-1"], ["--max-memory", "lots"], ["--max-parameters", "0"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["upscale", str(two_images), "-o", str(tmp_path), "-m", str(model_file), *bad])
        assert info.value.code == 2, bad
        assert "error:" in capsys.readouterr().err
    for argv in (["upscale", str(two_images), "-o", str(tmp_path / "o"), "-m", str(model_file), "--device", "tpu"],
                 ["info", str(model_file), "--device", "tpu"]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "unknown device 'tpu'" in err and len(err.strip().splitlines()) == 1, err


def test_cli_max_parameters_refuses_and_raises(model_file, capsys):
    code = cli.main(["info", str(model_file), "--max-parameters", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "above the limit of 1,000 parameters" in err and "--max-parameters" in err, err
    assert cli.main(["info", str(model_file), "--max-parameters", "100M"]) == 0
    capsys.readouterr()


# ==================================================================================== messages


def test_names_with_newlines_and_escapes_stay_on_one_line(tmp_path, model_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    evil = src / "evil\nname\x1b[31m\u202e.png"
    evil.write_text("not an image")
    PILImage.fromarray(_photo(8, 8)).save(src / "fine.png")
    code = cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "-m", str(model_file), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "\x1b" not in err and "\u202e" not in err, err
    lines = [line for line in err.splitlines() if "evil" in line]
    assert lines and all("evil\\nname\\x1b[31m\\u202e.png" in line for line in lines), err
    assert all("not a recognised image format" in line for line in lines)
    # The library's own errors are one line too, whatever the name holds.
    with pytest.raises(images.ImageReadError) as info:
        images.read_image(evil)
    assert one_line(str(info.value)) and "evil\\nname" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        esc_arch.load_model(evil)
    assert one_line(str(info.value))


def test_printable_copies_agree():
    for text in ("plain", "new\nline", "esc\x1b[0m", "bidi\u202e", "bad\udcff", "tab\t", "del\x7f", "ok é 漢字"):
        assert printable(text) == cli._printable(text)
    assert printable("a\nb\x1b") == "a\\nb\\x1b" and printable("ok é 漢字") == "ok é 漢字"
    assert cli._DEFAULT_MAX_PARAMETERS == esc_arch.checkpoint.DEFAULT_MAX_PARAMETERS


def test_symlink_loop_and_dangling_inputs_name_the_reason(tmp_path, model_file, capsys):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nothing.png")
    code = cli.main(["upscale", str(loop), str(dangling), "-o", str(tmp_path / "o"), "-m", str(model_file)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{loop}: too many levels of symbolic links" in err and f"{dangling}: a symbolic link to nothing" in err


# ============================================================================= temporary files


def test_sigterm_leaves_no_temporary_file_and_exits_143(tmp_path, model_file):
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(_photo(8, 8)).save(src / "a.png")
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import builtins, time
        from esc_sr import atomic
        from esc_sr import cli
        real_open = builtins.open

        class Slow:
            def __init__(self, handle): self.handle = handle
            def write(self, data):
                self.handle.write(data[: len(data) // 2]); self.handle.flush()
                real_open({str(ready)!r}, "w").close()
                time.sleep(60)
            def __getattr__(self, name): return getattr(self.handle, name)
            def __enter__(self): return self
            def __exit__(self, *exc): return self.handle.__exit__(*exc)

        def slow_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return Slow(handle) if mode == "wb" else handle

        atomic.open = slow_open
        raise SystemExit(cli.main(["upscale", {str(src)!r}, "-o", {str(out)!r}, "-m", {str(model_file)!r}, "-q"]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [p.name[: len(TEMP_PREFIX)] for p in out.iterdir()] == [TEMP_PREFIX]  # mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert list(out.iterdir()) == [], "SIGTERM must remove the temporary file"
    assert "terminated; files written so far are complete" in err and "0 written, 0 failed" in err


def test_stale_temporary_files_are_swept(two_images, tmp_path, model_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    old, young = out / f"{TEMP_PREFIX}old.png", out / f"{TEMP_PREFIX}young.png"
    old.write_bytes(b"left by a killed run")
    young.write_bytes(b"maybe another run writing now")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    code = cli.main(["upscale", str(two_images), "-o", str(out), "-m", str(model_file), "-q"])
    err = capsys.readouterr().err
    assert code == 0 and not old.exists() and young.exists()
    assert f"{out}: removed 1 temporary file left by a killed run" in err
