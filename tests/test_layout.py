"""The package boundary: esc_arch is the architecture, importable with torch + safetensors + numpy alone."""

from __future__ import annotations

import subprocess
import sys

# Everything the application and the hosts use that the core must not need.
_NOT_FOR_THE_CORE = ("PIL", "cv2", "tqdm", "chainner_ext", "spandrel", "basicsr", "torchvision", "onnx",
                     "onnxruntime", "yaml", "matplotlib", "esc_sr", "comfyui_nodes", "basicsr_plugin")

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


def test_esc_arch_never_imports_the_application():
    from pathlib import Path

    import esc_arch

    core = Path(esc_arch.__file__).parent
    offenders = [str(p.relative_to(core)) for p in core.rglob("*.py") if "esc_sr" in p.read_text(encoding="utf-8")
                 and any(line.lstrip().startswith(("import esc_sr", "from esc_sr")) for line in p.read_text().splitlines())]
    assert offenders == []
