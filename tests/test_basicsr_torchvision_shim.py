"""esc_sr.torchvision_shim repairs exactly one failure and stays out of the way otherwise.

Each case runs in a fresh interpreter with a stand-in ``torchvision`` package first on sys.path, so the behaviour is
tested whatever torchvision build this machine has.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A torchvision stand-in that fails like the CUDA wheel next to a CPU torch: unless the operator exists.
BROKEN_LIKE_THE_CUDA_WHEEL = """
import torch
try:
    torch.ops.torchvision.nms.default
except (AttributeError, RuntimeError):
    raise RuntimeError("operator torchvision::nms does not exist")
IMPORTS = globals().setdefault("IMPORTS", 0) + 1
transforms = "transforms stand-in"
"""

OTHER_FAILURE = """
raise RuntimeError("something else is broken in torchvision")
"""

HEALTHY = """
transforms = "transforms stand-in"
"""

PROBE = """
import sys, torch
from esc_sr import torchvision_shim
try:
    tv = torchvision_shim.ensure_torchvision_importable()
    print("imported", tv.transforms)
except RuntimeError as error:
    print("error", error)
print("applied", torchvision_shim.applied)
print("schema", "declared" if torchvision_shim.applied else "untouched")
"""


def _run(fake_package: str, tmp_path: Path) -> str:
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(fake_package))
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_declares_the_missing_operators_only_for_the_nms_failure(tmp_path):
    out = _run(BROKEN_LIKE_THE_CUDA_WHEEL, tmp_path)
    assert "imported transforms stand-in" in out and "applied True" in out


def test_other_import_errors_are_reraised_unchanged(tmp_path):
    out = _run(OTHER_FAILURE, tmp_path)
    assert "error something else is broken in torchvision" in out and "applied False" in out


def test_a_healthy_torchvision_is_left_alone(tmp_path):
    out = _run(HEALTHY, tmp_path)
    assert "imported transforms stand-in" in out and "applied False" in out and "untouched" in out


def test_basicsr_and_the_plugin_import_here():
    code = "import basicsr_plugin, basicsr.train, basicsr.models.realesrgan_model, torchvision.models; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# basicsr_plugin.compat is loaded from its file: importing the package would import the real basicsr.
ALIAS_PROBE = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("compat", {str(REPO / "basicsr_plugin" / "compat.py")!r})
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
print("aliased", compat.alias_removed_functional_tensor())
import torchvision.transforms.functional_tensor as ft, torchvision.transforms.functional as f
print("same", ft is f)
"""


def _run_alias_probe(tmp_path: Path, with_functional_tensor: bool) -> str:
    transforms = tmp_path / "torchvision" / "transforms"
    transforms.mkdir(parents=True)
    (tmp_path / "torchvision" / "__init__.py").write_text("")
    (transforms / "__init__.py").write_text("")
    (transforms / "functional.py").write_text("def rgb_to_grayscale(img):\n    return img\n")
    if with_functional_tensor:
        (transforms / "functional_tensor.py").write_text("OWN = True\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", ALIAS_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_original_basicsr_gets_the_removed_torchvision_module_as_an_alias(tmp_path):
    assert _run_alias_probe(tmp_path, with_functional_tensor=False).split() == ["aliased", "True", "same", "True"]


def test_an_existing_functional_tensor_module_is_never_replaced(tmp_path):
    assert _run_alias_probe(tmp_path, with_functional_tensor=True).split() == ["aliased", "False", "same", "False"]
