"""The chaiNNer route (b): `esc-sr chainner install` puts a lazy startup hook into a Python's
site-packages, and chaiNNer's own loading sequence then loads ESC checkpoints.

Every test runs fresh interpreters of a throw-away virtual environment (made with `venv`, no pip)
so that `site` really processes the installed `.pth` file at start-up, as in chaiNNer's Python.
The environment sees this checkout and the test venv's packages through a plain path `.pth`.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

from esc_sr import cli
from esc_sr.chainner_hook import HOOK_MODULE, HookError, install_hook, locate, uninstall_hook

from golden import GOLDEN_DIR

REPO = Path(__file__).resolve().parents[1]
HERE_PACKAGES = sysconfig.get_paths()["purelib"]  # torch, spandrel, spandrel_extra_arches live here


def _make_python(root: Path, *, paths: list[str]) -> Path:
    """A fresh venv whose site-packages also lists ``paths`` (via a plain path .pth)."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site_packages = locate(python).site_packages
    (site_packages / "deps.pth").write_text("".join(f"{p}\n" for p in paths))
    return python


def _run(python: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    # cwd: not the checkout, which `python -c` would otherwise put on sys.path.
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=300, cwd=python.parents[2],
    )


@pytest.fixture()
def full_python(tmp_path: Path) -> Path:
    """A Python that has torch, spandrel, spandrel_extra_arches and esc-sr, like a prepared chaiNNer."""
    return _make_python(tmp_path / "py", paths=[HERE_PACKAGES, str(REPO)])


# chaiNNer's sequence (backend/src/packages/chaiNNer_pytorch/pytorch/io/load_model.py): add the extra
# architectures without ignore_duplicates at import time, load with ModelLoader(device), freeze,
# eval, then .half() only where the descriptor says it supports fp16.
CHAINNER_SEQUENCE = """
    import json, sys
    state_at_start = {name: name in sys.modules for name in ("esc_sr_chainner_hook", "torch", "esc_arch", "spandrel")}

    import torch
    from spandrel import MAIN_REGISTRY, ModelLoader
    from spandrel_extra_arches import EXTRA_REGISTRY

    MAIN_REGISTRY.add(*EXTRA_REGISTRY)

    results = []
    for path in sys.argv[1:]:
        model = ModelLoader(torch.device("cpu")).load_from_file(path)
        for parameter in model.model.parameters():
            parameter.requires_grad = False
        model.eval()
        model = model.half() if model.supports_half else model.float()
        image = torch.rand(1, 3, 19, 23).to(model.dtype)
        out = model(image)
        results.append({
            "arch": model.architecture.id, "scale": model.scale, "dtype": str(out.dtype),
            "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
            "in_range": bool(out.min() >= 0 and out.max() <= 1),
        })
    print(json.dumps({"start": state_at_start, "results": results}))
"""


def test_chainner_loading_sequence_loads_esc_pth_and_safetensors(full_python: Path, tmp_path: Path) -> None:
    import esc_arch

    tiny = esc_arch.esc_tiny(2, n_blocks=1, conv_blocks=2)
    ours = esc_arch.save_model(tiny, tmp_path / "2x_esc_tiny.safetensors")
    files = [
        str(GOLDEN_DIR / "escrealm_pixelshuffle_x4.ckpt.pth"),          # official BasicSR .pth
        str(GOLDEN_DIR / "trainner_escrealm_x2.ckpt.safetensors"),      # traiNNer-redux safetensors
        str(GOLDEN_DIR / "lte_esc.ckpt.pth"),                           # supports_half False -> .float()
        str(ours),                                                      # written by esc_arch.save_model
    ]
    install_hook(full_python)

    done = _run(full_python, CHAINNER_SEQUENCE, *files)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The hook ran at start-up but imported nothing heavy: torch/esc_arch came only with spandrel.
    assert report["start"] == {"esc_sr_chainner_hook": True, "torch": False, "esc_arch": False, "spandrel": False}
    assert [(r["arch"], r["scale"], r["dtype"]) for r in report["results"]] == [
        ("ESCRealM", 4, "torch.float16"),
        ("ESCRealM", 2, "torch.float16"),
        ("ESCLTE", 4, "torch.float32"),
        ("ESC", 2, "torch.float16"),
    ]
    for result in report["results"]:
        assert result["shape"] == [1, 3, 19 * result["scale"], 23 * result["scale"]]
        assert result["finite"] and result["in_range"]
    assert "esc-sr chainner hook" not in done.stderr  # no warnings


def test_without_the_hook_chainner_cannot_load_esc(full_python: Path) -> None:
    # This test venv's torchvision needs the shim to import next to CPU torch (the hook applies it;
    # chaiNNer's matching torchvision does not need it).
    shim = "from esc_arch._compat import ensure_torchvision_importable; ensure_torchvision_importable()\n"
    done = _run(full_python, shim + textwrap.dedent(CHAINNER_SEQUENCE), str(GOLDEN_DIR / "escrealm_pixelshuffle_x4.ckpt.pth"))

    assert done.returncode != 0
    assert "UnsupportedModelError" in done.stderr


def test_hook_is_harmless_without_torch_spandrel_or_esc_arch(tmp_path: Path) -> None:
    bare = _make_python(tmp_path / "bare", paths=[])
    install_hook(bare, require_esc_arch=False)

    # Started, and cheap: nothing beyond the standard library's start-up modules was imported.
    started = _run(bare, "import sys; print('esc_sr_chainner_hook' in sys.modules, any(m in sys.modules for m in ('torch', 'typing', 'importlib.abc')))")
    missing = _run(bare, "import spandrel")

    assert started.returncode == 0 and started.stdout.split() == ["True", "False"]
    assert started.stderr == ""
    assert list((locate(bare).site_packages / "__pycache__").glob(f"{HOOK_MODULE}.*.pyc"))  # compiled once
    assert missing.returncode == 1
    assert "No module named 'spandrel'" in missing.stderr
    assert "esc-sr chainner hook" not in missing.stderr


def test_hook_reports_in_one_line_when_esc_sr_is_missing_but_spandrel_loads(tmp_path: Path) -> None:
    no_esc = _make_python(tmp_path / "no_esc", paths=[HERE_PACKAGES])
    install_hook(no_esc, require_esc_arch=False)

    # The shim, loaded from its file (esc_arch itself must stay unimportable here), lets this
    # venv's torchvision import next to CPU torch.
    shim = REPO / "esc_arch" / "_compat" / "torchvision_shim.py"
    done = _run(no_esc, f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("torchvision_shim", {str(shim)!r})
        shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)
        shim.ensure_torchvision_importable()
        import spandrel
        print(len(spandrel.MAIN_REGISTRY) > 0, "ESC" in spandrel.MAIN_REGISTRY)
    """)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    warnings = [line for line in done.stderr.splitlines() if "esc-sr chainner hook" in line]
    assert len(warnings) == 1 and "esc_arch is not importable" in warnings[0]


def test_install_refuses_a_python_without_esc_sr_and_names_the_fix(tmp_path: Path) -> None:
    bare = _make_python(tmp_path / "bare", paths=[])

    with pytest.raises(HookError, match=r"esc-sr is not installed in .*-m pip install esc-sr"):
        install_hook(bare)
    assert not (locate(bare).site_packages / f"{HOOK_MODULE}.pth").exists()


def test_cli_install_is_idempotent_and_uninstall_removes_everything(full_python: Path, capsys) -> None:
    site_packages = locate(full_python).site_packages

    assert cli.main(["chainner", "install", "--python", str(full_python)]) == 0
    assert cli.main(["chainner", "install", "--python", str(full_python)]) == 0
    assert (site_packages / f"{HOOK_MODULE}.pth").read_text().strip().endswith(f"import {HOOK_MODULE}")
    assert (site_packages / f"{HOOK_MODULE}.py").exists()

    assert cli.main(["chainner", "uninstall", "--python", str(full_python)]) == 0
    assert not (site_packages / f"{HOOK_MODULE}.pth").exists()
    assert not (site_packages / f"{HOOK_MODULE}.py").exists()
    assert cli.main(["chainner", "uninstall", "--python", str(full_python)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    after = _run(full_python, "import sys; print('esc_sr_chainner_hook' in sys.modules)")
    assert after.stdout.strip() == "False"


def test_uninstall_leaves_foreign_files_alone(full_python: Path) -> None:
    foreign = locate(full_python).site_packages / f"{HOOK_MODULE}.pth"
    foreign.write_text("import something_else\n")

    with pytest.raises(HookError, match="not written by esc-sr"):
        uninstall_hook(full_python)
    with pytest.raises(HookError, match="not written by esc-sr"):
        install_hook(full_python)
    assert foreign.read_text() == "import something_else\n"


def test_cli_reports_a_missing_python_in_one_line(capsys) -> None:
    assert cli.main(["chainner", "install", "--python", "/nonexistent/python3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["esc-sr chainner: error: /nonexistent/python3: no such Python executable"]
