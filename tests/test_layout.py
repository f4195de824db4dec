"""The package boundaries: esc_arch is the architecture, importable with torch + safetensors + numpy alone, and
plain PyTorch; esc_runtime (the inference runtime) imports it and is never imported by it; imports go
hosts -> esc_sr -> esc_runtime -> esc_arch."""

from __future__ import annotations

import subprocess
import sys

# Everything the application and the hosts use that the core must not need.
_NOT_FOR_THE_CORE = ("PIL", "cv2", "tqdm", "chainner_ext", "spandrel", "basicsr", "torchvision", "onnx",
                     "onnxruntime", "yaml", "matplotlib", "esc_sr", "esc_runtime", "comfyui_nodes",
                     "basicsr_plugin")

# The application's packages are made absent as Python sees an uninstalled package: ``sys.modules[name] = None``
# makes ``import name`` fail and ``importlib.util.find_spec(name)`` answer None (torch's own optional-dependency
# probes, e.g. torch._dynamo's, ask find_spec and carry on).
_PROBE = f"""
import sys
for name in {_NOT_FOR_THE_CORE!r}:
    sys.modules[name] = None
import torch, esc_arch
model = esc_arch.load_model("default")
with torch.no_grad():
    out = esc_arch.fuse(model)(torch.rand(1, 3, 20, 24))
assert out.shape == (1, 3, 80, 96), out.shape
for name in esc_arch.PRESETS:
    esc_arch.PRESETS[name]()
print("ok", sorted(m for m, module in sys.modules.items() if m.split(".")[0] in {_NOT_FOR_THE_CORE!r} and module))
"""


def test_the_core_runs_without_any_application_dependency():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok []"


def _importers(package: str, imported: str) -> list[str]:
    """The modules of ``package`` with an import statement of ``imported``."""
    import importlib
    from pathlib import Path

    root = Path(importlib.import_module(package).__file__).parent
    return [str(p.relative_to(root)) for p in root.rglob("*.py")
            if any(line.lstrip().startswith((f"import {imported}", f"from {imported}"))
                   for line in p.read_text(encoding="utf-8").splitlines())]


def test_esc_arch_never_imports_the_runtime_or_the_application():
    assert _importers("esc_arch", "esc_runtime") == []
    assert _importers("esc_arch", "esc_sr") == []


def test_the_runtime_never_imports_the_application():
    assert _importers("esc_runtime", "esc_sr") == []


def test_the_model_code_is_plain_pytorch():
    """No environment switches, subprocesses, native libraries, private operators or tracing guards in esc_arch:
    what runs is what the forward methods say, on any device."""
    from pathlib import Path

    import esc_arch

    forbidden = ("os.environ", "subprocess", "ctypes", "torch.ops", "is_tracing", "is_compiling", "is_in_onnx_export")
    root = Path(esc_arch.__file__).parent
    found = [(str(p.relative_to(root)), word) for p in root.rglob("*.py") for word in forbidden
             if word in p.read_text(encoding="utf-8")]
    assert found == []


def test_the_model_files_fit_their_budget():
    """The architecture (layers, attention, blocks, heads, models) in at most 1,400 lines."""
    from pathlib import Path

    import esc_arch

    root = Path(esc_arch.__file__).parent
    model_files = ("layers", "attention", "blocks", "upsamplers", "base", "esc", "esc_real", "lte")
    lines = {p.stem: len(p.read_text(encoding="utf-8").splitlines()) for p in root.rglob("*.py")}
    assert sum(lines[name] for name in model_files) <= 1400


def test_the_architecture_package_fits_its_budget():
    """esc_arch as a whole (the model, presets, detection, loading, the spandrel architectures) in at most 2,400 lines:
    what is not the model's (atomic writes, saving, the torchvision import repair) lives in the application."""
    from pathlib import Path

    import esc_arch

    root = Path(esc_arch.__file__).parent
    lines = {str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines()) for p in root.rglob("*.py")}
    assert sum(lines.values()) <= 2400, sorted(lines.items(), key=lambda item: -item[1])


def test_every_application_module_reads_in_one_sitting():
    """No module of esc_sr over 500 lines."""
    from pathlib import Path

    import esc_sr

    root = Path(esc_sr.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}
