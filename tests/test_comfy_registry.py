"""Comfy Registry readiness (issue 27, item 3), checked without comfy-cli or the network.

``pyproject.toml`` against the Registry specification (docs.comfy.org/registry/specifications, as comfy-cli 1.23's
``config_parser`` reads it), and ``.comfyignore`` against what the node package needs: nothing the pack imports
may be left out. ``scripts/comfy_pack_check.py`` builds the real archive with comfy-cli and loads it in the real
ComfyUI (it needs comfy-cli installed, so it is a script, run for the issue's note).
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_PACKAGES = ("comfyui_nodes", "esc_arch", "esc_runtime", "esc_sr")


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_project_table_meets_the_registry_specification():
    project = _pyproject()["project"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) and not re.search(r"[-_.]{2}", name)
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"] in ({"text": "MIT"}, {"file": "LICENSE"})
    assert project["urls"]["Repository"].startswith("https://github.com/")


def test_tool_comfy_table_names_publisher_display_name_icon_and_includes():
    comfy = _pyproject()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/docs/icon.png")
    assert isinstance(comfy["includes"], list)
    assert comfy["requires-comfyui"].startswith(">=")
    from PIL import Image

    with Image.open(REPO_ROOT / "docs" / "icon.png") as icon:  # the Registry takes icons up to 800x400
        assert icon.width <= 800 and icon.height <= 400


def _ignored_prefixes() -> list[str]:
    lines = (REPO_ROOT / ".comfyignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_comfyignore_keeps_tests_benchmarks_and_training_options_out():
    patterns = _ignored_prefixes()
    for kept_out in ("tests/", "benchmarks/", "options/", "scripts/", "basicsr_plugin/", "train.py", "test.py"):
        assert kept_out in patterns
    for needed in (*PACK_PACKAGES, "__init__.py", "pyproject.toml", "requirements.txt", "examples", "README.md"):
        assert not any(p.rstrip("/") == needed for p in patterns), needed


def test_the_node_package_imports_nothing_comfyignore_leaves_out():
    """Every module of the pack's packages imports only the pack's packages among this repository's folders."""
    left_out = {p.rstrip("/").removesuffix(".py") for p in _ignored_prefixes()} | {"train", "test"}
    for package in PACK_PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for name in names:
                    assert name.split(".")[0] not in left_out, f"{path.relative_to(REPO_ROOT)} imports {name}"


def test_requirements_for_registry_installs_leave_torch_to_comfyui():
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    packages = {re.split(r"[<>=!~\[ ]", line)[0].lower() for line in lines if line}
    assert "torch" not in packages and "torchvision" not in packages
    assert {"safetensors", "numpy", "spandrel", "chainner-ext"} <= packages
