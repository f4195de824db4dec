"""``scripts/spandrel_upstream.py``: ESC as an architecture inside spandrel itself (issue 27, item 1).

CI cannot fetch spandrel's repository, so the checkout here is made from the spandrel package installed in this
environment (0.4.2, whose code is that of the repository's main branch it was released from) plus a README with
its super-resolution list. The generated folder is then imported as part of that spandrel, in a fresh interpreter,
and must detect and load every golden checkpoint (official, neosr and traiNNer-redux layouts) into the expected
architecture, computing the upstream outputs within 1e-4. Spandrel's own test suite, run on a real checkout with
these files, is reported in the issue's note (it needs spandrel's dev dependencies and downloads).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import spandrel_upstream  # noqa: E402
from golden import GOLDEN_DIR, golden_cases  # noqa: E402

README = """# Spandrel

#### Single Image Super Resolution

- [FDAT](https://github.com/stinkybread/FDAT) | [Models](https://example.invalid/fdat)
- [AuraSR](https://github.com/fal-ai/aura-sr) | Models: [v1](https://huggingface.co/fal/AuraSR)

#### Face Restoration
"""



def _expected_architecture(case: dict) -> str:
    """The spandrel id a golden checkpoint must be detected as: its upstream class, or for neosr's ``esc`` (one
    class with a realsr switch) and esc_arb's ``LTE`` the esc_arch class they correspond to."""
    cls = case["source"]["class"]
    if case["checkpoint"]["format"] == "neosr":
        return "ESCReal" if "real" in case["id"] else "ESC"
    return {"LTE": "ESCLTE"}.get(cls, cls)


EXPECTED = {case["id"]: _expected_architecture(case) for case in golden_cases()}


def _installed_spandrel() -> Path:
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import spandrel

    return Path(spandrel.__file__).resolve().parent


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spandrel_checkout")
    shutil.copytree(_installed_spandrel(), root / "libs" / "spandrel" / "spandrel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "README.md").write_text(README)
    (root / "tests").mkdir()
    spandrel_upstream.generate(root)
    return root


def test_the_generated_model_code_is_esc_arch_itself_with_its_licence(checkout):
    arch = checkout / spandrel_upstream.ARCH_DIR / "__arch"
    for name in spandrel_upstream.ARCH_MODULES:
        generated = (arch / f"{name}.py").read_text()
        source = (REPO_ROOT / "esc_arch" / f"{name}.py").read_text()
        assert generated.endswith(source) and "scripts/spandrel_upstream.py" in generated.splitlines()[0]
    assert "MIT License" in (arch / "LICENSE").read_text()
    assert sorted(p.name for p in arch.iterdir()) == sorted([f"{n}.py" for n in spandrel_upstream.ARCH_MODULES]
                                                            + ["LICENSE"])


def test_generation_is_idempotent_and_edits_registry_and_readme_once(checkout):
    registry = checkout / spandrel_upstream.REGISTRY_FILE
    readme = checkout / "README.md"
    before = registry.read_text(), readme.read_text()
    spandrel_upstream.generate(checkout)
    assert (registry.read_text(), readme.read_text()) == before
    text = registry.read_text()
    assert text.count("    ESC,\n") == 1 and text.count("ESC.ESCArch()") == 1
    assert text.index("AuraSR.AuraSRArch()") < text.index("ESC.ESCArch()")  # appended last: claims nothing earlier
    assert readme.read_text().count(spandrel_upstream.README_LINE) == 1
    assert (checkout / "tests" / "test_ESC.py").is_file()


def test_the_model_code_imports_only_what_spandrel_allows(tmp_path, monkeypatch):
    fake = tmp_path / "esc_arch"
    fake.mkdir()
    for name in spandrel_upstream.ARCH_MODULES:
        shutil.copy(REPO_ROOT / "esc_arch" / f"{name}.py", fake / f"{name}.py")
    (fake / "layers.py").write_text((fake / "layers.py").read_text() + "\nimport safetensors\n")
    monkeypatch.setattr(spandrel_upstream, "ESC_ARCH", fake)
    with pytest.raises(spandrel_upstream.UpstreamError, match="layers.py imports safetensors"):
        spandrel_upstream.generated_arch_files()
    (fake / "layers.py").write_text((REPO_ROOT / "esc_arch" / "layers.py").read_text() + "\nfrom .checkpoint import x\n")
    with pytest.raises(spandrel_upstream.UpstreamError, match="imports .checkpoint"):
        spandrel_upstream.generated_arch_files()


def test_not_a_spandrel_checkout_is_refused(tmp_path):
    with pytest.raises(spandrel_upstream.UpstreamError, match="not a spandrel checkout"):
        spandrel_upstream.generate(tmp_path)


CHECK = textwrap.dedent('''
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    from esc_sr.torchvision_shim import ensure_torchvision_importable
    ensure_torchvision_importable()
    sys.path.insert(0, {libs!r})
    import spandrel
    from safetensors.torch import load_file
    from spandrel import MAIN_REGISTRY, ModelLoader
    from spandrel.architectures.ESC import ESCLTE
    assert spandrel.__file__.startswith({libs!r}), spandrel.__file__
    ids = [s.architecture.id for s in MAIN_REGISTRY.architectures()]
    assert len(ids) == len(set(ids)), ids
    result = {{"ids": ids}}
    torch.manual_seed(0)
    for case in json.load(open({golden!r} + "/cases.json"))["cases"]:
        path = {golden!r} + "/" + case["checkpoint"]["file"]
        try:
            descriptor = ModelLoader().load_from_file(path)
        except Exception as exc:
            result[case["id"]] = {{"error": f"{{type(exc).__name__}}: {{exc}}"}}
            continue
        tensors = load_file({golden!r} + "/" + case["tensors"]["file"])
        entry = {{"arch": descriptor.architecture.id, "scale": descriptor.scale, "tags": descriptor.tags,
                  "half": descriptor.supports_half, "multiple_of": descriptor.size_requirements.multiple_of}}
        model = descriptor.model.eval()
        with torch.no_grad():
            if isinstance(model, ESCLTE):
                import esc_arch
                x = torch.rand(1, 3, 19, 23)
                reference = esc_arch.load_model(path).eval()
                entry["max_abs_diff"] = (model.upscale_by(x, 2.5) - reference.upscale_by(x, 2.5)).abs().max().item()
            elif "x1" in tensors and case["id"] != "esc_x2_into_x4":
                entry["max_abs_diff"] = (model(tensors["x1"]) - tensors["y1"]).abs().max().item()
        result[case["id"]] = entry
    print(json.dumps(result))
''')


@pytest.fixture(scope="module")
def loaded(checkout) -> dict:
    script = CHECK.format(repo=str(REPO_ROOT), libs=str(checkout / "libs" / "spandrel"), golden=str(GOLDEN_DIR))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_spandrel_with_the_generated_folder_registers_the_esc_architectures_last(loaded):
    assert loaded["ids"][-5:] == list(spandrel_upstream.ARCH_IDS)


@pytest.mark.parametrize("case_id", sorted(EXPECTED))
def test_spandrel_with_the_generated_folder_loads_every_golden_checkpoint(loaded, case_id):
    """Official (BasicSR), esc_arb (LTE), neosr and traiNNer-redux layouts: the right architecture, the upstream
    output within 1e-4; only the x0.25 ESCRealM configuration is refused, with its reason."""
    entry = loaded[case_id]
    if case_id == "escrealm_conv_x1_unshuffle":
        assert "scales by 0.25x" in entry["error"]
        return
    assert "error" not in entry, entry
    assert entry["arch"] == EXPECTED[case_id]
    if "max_abs_diff" in entry:
        assert entry["max_abs_diff"] <= 1e-4, entry
    if entry["arch"] == "ESCLTE":
        assert entry["scale"] == 4 and not entry["half"] and entry["multiple_of"] == 1
    else:
        assert entry["half"] and entry["multiple_of"] in (8, 16, 32, 48)


def test_every_layout_is_covered():
    layouts = {case["checkpoint"]["format"] for case in golden_cases()}
    assert {"basicsr", "esc_arb"} <= layouts and any("neosr" in c["id"] for c in golden_cases())
    assert any("trainner" in c["id"] for c in golden_cases())
