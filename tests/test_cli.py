"""The ``esc-sr`` command line, run in-process through ``main(argv)`` and once as a real subprocess.

Exit statuses: 0 all written (or skipped because the output exists), 1 some image failed,
2 usage errors (bad arguments, a model that cannot be loaded, no input at all).
"""

from __future__ import annotations

import argparse
import contextlib

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors import safe_open

import esc_arch
import esc_sr
from esc_sr import cli, images
from golden import GOLDEN_DIR  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN = GOLDEN_DIR


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_x2.safetensors"
    esc_sr.save_model(esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1), path)
    return path


def _photo(h: int = 12, w: int = 16, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(h * w + channels)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return (rng.random(shape) * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder as users have it: good images of several kinds, and three bad files."""
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(_photo()).save(src / "photo.png")
    PILImage.fromarray(_photo(channels=1)).save(src / "scan.png")
    PILImage.fromarray(_photo(channels=3)).save(src / "shot.jpg", quality=95)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("not an image")
    data = (src / "photo.png").read_bytes()
    (src / "cut.png").write_bytes(data[: len(data) // 2])
    (src / "readme.txt").write_text("ignored: not an image extension")
    return src


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ upscale


def test_bad_files_in_a_folder_do_not_stop_the_rest(folder, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["upscale", folder, "-o", out, "-m", model_file], capsys)
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["photo_x2.png", "scan_x2.png", "shot_x2.jpg"]
    with PILImage.open(out / "scan_x2.png") as scan:
        assert scan.mode == "L" and scan.size == (32, 24)
    assert "3 written, 3 failed" in err
    for name, reason in (("empty.png", "empty file"), ("notes.png", "not a recognised image"),
                         ("cut.png", "corrupt or truncated")):
        lines = [line for line in err.splitlines() if name in line]
        assert lines and all(reason in line for line in lines), (name, err)
    assert "Traceback" not in err and "readme" not in err


def test_a_folder_is_upscaled_inside_one_heap_scope(folder, model_file, tmp_path, capsys, monkeypatch):
    """Each image reuses the memory the one before freed (esc_sr/heap.py): the CLI opens one heap scope around its
    loop, every image is upscaled inside it, and it is closed at the end (its settings undone)."""
    from esc_sr import engine, heap

    opened: list[object] = []  # the scopes open now (the CLI's, and any the engine opens per call)
    real_scope = heap.reusing_freed_memory

    @contextlib.contextmanager
    def recording_scope(device="cpu"):
        opened.append(device)
        try:
            with real_scope(device) as applied:
                yield applied
        finally:
            opened.pop()

    open_at_each_image: list[int] = []
    upscale = engine.upscale
    monkeypatch.setattr(heap, "reusing_freed_memory", recording_scope)
    monkeypatch.setattr(engine, "upscale", lambda *a, **k: open_at_each_image.append(len(opened)) or upscale(*a, **k))
    code, _, _ = run(["upscale", folder, "-o", tmp_path / "out", "-m", model_file], capsys)
    assert code == 1 and open_at_each_image == [1, 1, 1]  # three good images, each inside the loop's one scope
    assert opened == [] and heap._depth == 0


def test_single_file_to_an_explicit_output_name(folder, model_file, tmp_path, capsys):
    target = tmp_path / "big.webp"
    code, _, err = run(["upscale", folder / "photo.png", "-o", target, "-m", model_file, "--tile", "0"], capsys)
    assert code == 0, err
    assert images.read_image(target).pixels.shape == (24, 32, 3)
    assert "1 written, 0 failed" in err


def test_globs_suffix_extension_and_outscale(folder, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    pattern = str(folder / "*.png")  # photo.png, scan.png and the three bad files, not shot.jpg
    code, _, err = run(["upscale", pattern, "-o", out, "-m", model_file, "--suffix=-big", "--ext", "tif",
                        "--outscale", "1.5", "--tile", "16", "--overlap", "16", "-q"], capsys)
    assert code == 1 and "2 written, 3 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["photo-big.tif", "scan-big.tif"]
    assert images.read_image(out / "photo-big.tif").pixels.shape == (18, 24, 3)


def test_existing_outputs_are_kept_unless_overwrite(folder, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo_x2.png").write_bytes(b"keep me")
    code, _, err = run(["upscale", folder / "photo.png", "-o", out, "-m", model_file], capsys)
    assert code == 0 and (out / "photo_x2.png").read_bytes() == b"keep me"
    assert "skipped, output exists (use --overwrite" in err
    code, _, _ = run(["upscale", folder / "photo.png", "-o", out, "-m", model_file, "--overwrite"], capsys)
    assert code == 0 and images.read_image(out / "photo_x2.png").pixels.shape == (24, 32, 3)


def test_an_input_is_never_overwritten_unless_asked(folder, model_file, capsys):
    before = (folder / "photo.png").read_bytes()
    code, _, err = run(["upscale", folder / "photo.png", "-o", folder, "-m", model_file, "--suffix", ""], capsys)
    assert code == 0 and (folder / "photo.png").read_bytes() == before
    assert "output is the input file" in err


def test_two_inputs_cannot_claim_one_output(tmp_path, model_file, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        PILImage.fromarray(_photo()).save(tmp_path / sub / "same.png")
    out = tmp_path / "out"
    code, _, err = run(["upscale", tmp_path / "a" / "same.png", tmp_path / "b" / "same.png", "-o", out,
                        "-m", model_file], capsys)
    assert code == 1 and "would also be written" in err
    assert [p.name for p in out.iterdir()] == ["same_x2.png"]


def test_recursive_folders_keep_their_structure(tmp_path, model_file, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    PILImage.fromarray(_photo()).save(tmp_path / "in" / "top.png")
    PILImage.fromarray(_photo()).save(tmp_path / "in" / "sub" / "deep.png")
    code, _, _ = run(["upscale", tmp_path / "in", "-r", "-o", tmp_path / "out", "-m", model_file], capsys)
    assert code == 0
    assert (tmp_path / "out" / "top_x2.png").is_file() and (tmp_path / "out" / "sub" / "deep_x2.png").is_file()


def test_usage_errors_are_one_line_with_status_2(folder, model_file, tmp_path, capsys):
    cases = [
        (["upscale", folder / "photo.png", "-o", tmp_path, "-m", tmp_path / "missing.pth"], "missing.pth"),
        (["upscale", folder / "photo.png", "-o", tmp_path, "-m", folder / "notes.png"], "notes.png"),
        (["upscale", tmp_path / "nothing*.png", "-o", tmp_path, "-m", model_file], "no input images"),
    ]
    for argv, needle in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], err
        assert "Traceback" not in err


def test_bad_option_values_are_argparse_errors(folder, model_file, tmp_path, capsys):
    for bad in (["--tile", "big"], ["--outscale", "-2"], ["--precision", "fp8"], ["--overlap", "-1"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["upscale", str(folder), "-o", str(tmp_path), "-m", str(model_file), *bad])
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_debug_shows_the_traceback(folder, tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02garbage")
    code, _, err = run(["upscale", folder / "photo.png", "-o", tmp_path, "-m", broken], capsys)
    assert code == 2 and "Traceback" not in err and "broken.pth" in err
    code, _, err = run(["--debug", "upscale", folder / "photo.png", "-o", tmp_path, "-m", broken], capsys)
    assert code == 2 and "Traceback" in err
    code, _, err = run(["upscale", folder / "photo.png", "-o", tmp_path, "-m", broken, "--debug"], capsys)
    assert "Traceback" in err


def test_arbitrary_scale_model_needs_outscale(tmp_path, folder, capsys):
    path = tmp_path / "lte.safetensors"
    esc_sr.save_model(esc_arch.esc_lte(dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1, window_size=16,
                                         hidden_dim=32, mlp_hidden=(32,)), path)
    code, _, err = run(["upscale", folder / "photo.png", "-o", tmp_path / "o", "-m", path], capsys)
    assert code == 2 and "needs --outscale" in err
    code, _, err = run(["upscale", folder / "photo.png", "-o", tmp_path / "o", "-m", path, "-s", "2.5"], capsys)
    assert code == 0, err
    assert images.read_image(tmp_path / "o" / "photo_x2.5.png").pixels.shape == (30, 40, 3)


# --------------------------------------------------------------------------------- info, convert


def test_info_describes_the_model(model_file, capsys):
    code, out, _ = run(["info", model_file], capsys)
    assert code == 0
    assert "variant:          ESC (custom configuration)" in out
    assert "scale:            x2" in out and "parameters:       " in out
    assert "attention:        sdpa -> " in out
    code, out, _ = run(["info", model_file, "--json", "--attention", "naive"], capsys)
    facts = json.loads(out)
    model = esc_arch.load_model(model_file)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["hyperparameters"]["dim"] == 16 and facts["attention_kernel"].startswith("naive")


def test_info_names_a_preset(tmp_path, capsys):
    path = tmp_path / "light.safetensors"
    esc_sr.save_model(esc_arch.esc_tiny(4), path)
    code, out, _ = run(["info", path], capsys)
    assert code == 0 and "variant:          ESC (preset esc_tiny)" in out


def test_convert_an_upstream_checkpoint_to_safetensors(tmp_path, capsys):
    source = GOLDEN / "esc_light_x2.ckpt.pth"
    out = tmp_path / "light.safetensors"
    code, printed, err = run(["convert", source, out], capsys)
    assert code == 0, err
    assert f"wrote {out}: ESC x2, 603,600 parameters, fp32" in printed
    original, converted = esc_arch.load_model(source), esc_arch.load_model(out)
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=0, rtol=0)

    half = tmp_path / "light_fp16.safetensors"
    assert run(["convert", out, half, "--half"], capsys)[0] == 0
    with safe_open(str(half), "pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys())
    assert half.stat().st_size < 0.6 * out.stat().st_size

    code, _, err = run(["convert", source, out], capsys)  # exists
    assert code == 2 and "use --overwrite" in err
    code, _, err = run(["convert", source, tmp_path / "x.pth"], capsys)
    assert code == 2 and "must be a .safetensors file" in err


# ---------------------------------------------------------------------------- the program


COMMANDS = ("upscale", "info", "convert", "models", "demo", "export-onnx", "chainner")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def test_help_lists_every_command_without_loading_torch():
    code = (
        "import sys\n"
        "from esc_sr import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit as done:\n    assert done.code == 0, done.code\n"
        "print(sorted(m for m in ('torch', 'numpy', 'esc_arch', 'esc_sr.hub', 'esc_sr.engine') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert all(name in proc.stdout for name in COMMANDS)


def test_every_command_has_help(capsys):
    for argv in [[name, "--help"] for name in COMMANDS] + [["chainner", "install", "--help"], ["--version"]]:
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0, argv
        assert capsys.readouterr().out, argv
    with pytest.raises(SystemExit) as done:
        cli.main(["chainner", "install", "--python", "/x", "--debug", "--no-such-option"])
    assert done.value.code == 2 and "--no-such-option" in capsys.readouterr().err


def test_the_options_offer_what_the_library_has():
    """The choices and defaults come from esc_sr.facts (checked against their owners in tests/test_facts.py)."""
    from esc_sr import engine, facts

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("upscale", "info"):
        options = {action.dest: action for action in commands[name]._actions}
        assert tuple(options["attention"].choices) == tuple(esc_arch.ATTENTION_BACKENDS), name
        assert tuple(options["precision"].choices) == facts.PRECISIONS, name
    options = {action.dest: action for action in commands["upscale"]._actions}
    assert tuple(options["alpha"].choices) == facts.ALPHA_MODES
    assert options["overlap"].default == engine.DEFAULT_OVERLAP


def test_library_modules_do_not_import_the_cli():
    code = "import sys, esc_sr.hub, esc_sr.demo, esc_sr.onnx_export, esc_sr.chainner_hook; print('esc_sr.cli' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_cli_errors_are_esc_errors():
    error = cli.CliError("x")
    assert isinstance(error, esc_arch.ESCError) and error.code == 2
    assert cli.CliError("y", code=1).code == 1


def test_an_internal_error_is_one_line_asking_for_a_report(model_file, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'x'")

    monkeypatch.setattr(cli.info, "describe_model", broken)  # the info subcommand's module (esc_sr/cli/info.py)
    code, out, err = run(["info", model_file], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("esc-sr info: internal error: TypeError: unexpected keyword argument 'x'")
    assert "rerun with --debug" in lines[0] and "report" in lines[0]
    code, _, err = run(["info", model_file, "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "esc-sr info: internal error: TypeError" in err


def test_a_file_system_error_is_one_line_naming_the_file(model_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run(["convert", model_file, blocker / "out.safetensors"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("esc-sr convert: error: ") and str(blocker) in lines[0] and "internal" not in lines[0]
    assert lines[0].endswith(f"{blocker / 'out.safetensors'}: {blocker} is a file, not a directory")  # not "File exists"


NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def test_convert_and_export_onto_a_full_disk_are_one_line_naming_the_file(model_file, tmp_path, capsys, monkeypatch):
    """Issue 26: "internal error: SafetensorError ... this is a bug" (convert) and a bare "[Errno 28] No space left on
    device" (export-onnx) on a full disk. Both now name the output and the reason, and leave nothing behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    def no_space_safetensors(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(NO_SPACE)

    def no_space_onnx(model, args, f, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space_safetensors)
    monkeypatch.setattr(torch.onnx, "export", no_space_onnx)
    out = tmp_path / "out"
    for argv, target in ((["convert", model_file, out / "m.safetensors"], out / "m.safetensors"),
                         (["export-onnx", model_file, out / "m.onnx", "--no-verify"], out / "m.onnx")):
        code, _, err = run(argv, capsys)
        assert code == 1 and err.strip() == f"esc-sr {argv[0]}: error: {target}: No space left on device", err
    assert list(out.iterdir()) == []


def test_an_output_that_is_a_folder_is_named_as_the_output(model_file, tmp_path, capsys):
    """Issue 26: `convert --overwrite` onto a folder named x.safetensors named the temporary file."""
    folder = tmp_path / "x.safetensors"
    folder.mkdir()
    code, _, err = run(["convert", model_file, folder, "--overwrite"], capsys)
    assert code == 2 and err.strip() == f"esc-sr convert: error: {folder}: is a directory, not a file", err
    assert ".esc-sr-tmp" not in err and list(folder.iterdir()) == []


def test_an_image_under_a_regular_file_fails_as_not_a_directory(folder, model_file, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    code, _, err = run(["upscale", folder / "photo.png", "-o", blocker / "photo_x2.png", "-m", model_file], capsys)
    assert code == 1 and f"{blocker} is a file, not a directory" in err and "File exists" not in err, err


def test_only_warnings_about_an_image_carry_its_name(folder, model_file, tmp_path, capsys, monkeypatch):
    """Issue 26: a warning of the runtime or of torch (not about an image) was printed as `a.png: warning: ...`. It is
    printed once, as the command's; a warning about the image (here its non-finite pixels) keeps the image's name."""
    import warnings

    from esc_sr import engine
    from esc_sr.errors import ImageWarning

    real = engine.upscale

    def upscale(model, image, **kwargs):
        warnings.warn("esc_runtime: not loading the native CPU kernels", RuntimeWarning)
        warnings.warn("something about this image", ImageWarning)
        return real(model, image, **kwargs)

    monkeypatch.setattr(engine, "upscale", upscale)
    src = tmp_path / "two"
    src.mkdir()
    for name in ("a.png", "b.png"):
        (src / name).write_bytes((folder / "photo.png").read_bytes())
    code, _, err = run(["upscale", src, "-o", tmp_path / "out", "-m", model_file], capsys)
    lines = err.strip().splitlines()
    assert code == 0, err
    assert lines.count("esc-sr upscale: warning: esc_runtime: not loading the native CPU kernels") == 1, err
    assert not any(line.endswith("warning: esc_runtime: not loading the native CPU kernels")
                   and not line.startswith("esc-sr upscale:") for line in lines), err
    for name in ("a.png", "b.png"):
        assert f"{src / name}: warning: something about this image" in lines, err


def test_console_entry_point_as_a_subprocess(folder, model_file, tmp_path):
    env = _env()
    proc = subprocess.run(
        [sys.executable, "-m", "esc_sr.cli", "upscale", str(folder), "-o", str(tmp_path / "out"),
         "-m", str(model_file), "--tile", "16", "--overlap", "16"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "3 written, 3 failed" in proc.stderr and "Traceback" not in proc.stderr
    assert len(list((tmp_path / "out").iterdir())) == 3
    proc = subprocess.run([sys.executable, "-m", "esc_sr.cli", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and all(name in proc.stdout for name in ("upscale", "info", "convert"))
