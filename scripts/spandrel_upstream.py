"""Write ESC into a checkout of chaiNNer-org/spandrel, as its CONTRIBUTING.md asks of a new architecture.

    python scripts/spandrel_upstream.py SPANDREL_CHECKOUT

writes (and overwrites, so it can be re-run after esc_arch changes):

* ``libs/spandrel/spandrel/architectures/ESC/__arch/``: the model code, generated from this package's ``esc_arch``
  modules (the model, its layers, the detection table), with a header naming the source and the ``LICENSE``. The
  files are copies made by this script, not a second copy to maintain: change ``esc_arch``, run this again.
  They depend on torch only (spandrel allows torch, torchvision, numpy and einops).
* ``libs/spandrel/spandrel/architectures/ESC/__init__.py``: one ``Architecture`` per ESC model class (ids ``ESC``,
  ``ESCFP``, ``ESCReal``, ``ESCRealM``, ``ESCLTE``, as ``esc_arch.spandrel`` registers them), each detecting with
  a ``KeyCondition`` built from the detection table and loading into an ``ImageModelDescriptor``.
* The registry lines (``__helpers/main_registry.py``: the import, and the architectures appended last) and the
  README line (the super-resolution list).
* ``tests/test_ESC.py`` in spandrel's style: ``assert_loads_correctly`` over the variants and their heads, size
  requirements, and snapshot/inference tests of official models (their snapshots and output images are made by
  ``pytest tests/test_ESC.py --snapshot-update`` where the official files can be downloaded).

Edits to existing files are idempotent (a second run changes nothing). ``tests/test_spandrel_upstream.py`` generates
the folder into a temporary directory and checks that it imports and loads the golden checkpoints.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ESC_ARCH = REPO_ROOT / "esc_arch"

#: esc_arch modules that make up the model (and its detection table), in dependency order.
ARCH_MODULES = ("errors", "layers", "attention", "upsamplers", "base", "blocks", "esc", "esc_real", "lte", "presets",
                "detection")
ALLOWED_IMPORTS = {"torch", "torchvision", "numpy", "einops", "triton"}  # triton: only probed, inside a try
ARCH_DIR = Path("libs/spandrel/spandrel/architectures/ESC")
REGISTRY_FILE = Path("libs/spandrel/spandrel/__helpers/main_registry.py")
ARCH_IDS = ("ESC", "ESCFP", "ESCRealM", "ESCReal", "ESCLTE")  # detection order (esc_arch.detection.VARIANTS)
ARCH_CLASSES = {"ESC": "ESCArch", "ESCFP": "ESCFPArch", "ESCReal": "ESCRealArch", "ESCRealM": "ESCRealMArch",
                "ESCLTE": "ESCLTEArch"}
README_LINE = ("- [ESC](https://github.com/dslisleedh/ESC) (ESC, ESC-light, ESC-XL, ESC-FP, ESC-Real, ESCRealM, "
               "arbitrary-scale ESC) | [Models](https://github.com/dslisleedh/ESC/releases/tag/1.0.0)")

HEADER = '''# Generated from esc-sr's esc_arch/{name}.py by scripts/spandrel_upstream.py
# (https://github.com/esc-sr/esc-sr): ESC, "Emulating Self-attention with Convolution for Efficient Image
# Super-Resolution" (Lee, Yun, Ro, ICCV 2025, arXiv 2503.06671). Edit it there and regenerate.
'''

LICENSE = """MIT License

Copyright (c) 2025-2026 ESC-SR developers

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

---

This code is esc-sr's implementation of the ESC architecture (esc_arch), weight-compatible with the official
implementation at https://github.com/dslisleedh/ESC (MIT License, Copyright (c) 2025 Dongheon Lee; its
arbitrary-scale part, esc_arb, is BSD 3-Clause, Copyright (c) 2025, Dongheon Lee). It was written from the
architecture's description and contains no code of the official repository.
"""

INIT = '''"""ESC: "Emulating Self-attention with Convolution for Efficient Image Super-Resolution" (ICCV 2025).

Official code and models: https://github.com/dslisleedh/ESC. The model code in ``__arch`` is generated from
esc-sr's ``esc_arch`` (https://github.com/esc-sr/esc-sr), which loads every layout below with ``strict=True``.

=========  =========================================================================================
id         checkpoints
=========  =========================================================================================
ESC        official ESC / ESC-light / ESC-XL, neosr ``esc`` (``realsr=False``)
ESCFP      official ESC-FP, neosr ``esc_fp``
ESCReal    official ESC-Real (nearest+conv and DySample heads), neosr ``esc`` (``realsr=True``)
ESCRealM   official ESCRealM, traiNNer-redux ``escrealm`` (every upsampler, x1-x4)
ESCLTE     official arbitrary-scale ESC (esc_arb, LTE decoder); described as a x4 model
=========  =========================================================================================

Hyperparameters are read from tensor shapes by the detection table ``__arch/detection.py``.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from typing_extensions import override

from spandrel.util import KeyCondition

from ...__helpers.model_descriptor import (
    Architecture,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from .__arch.base import ESCModelBase
from .__arch.detection import VARIANTS, Variant, infer_architecture
from .__arch.esc import ESC, ESCFP
from .__arch.esc_real import ESCReal, ESCRealM
from .__arch.lte import ESCLTE
from .__arch.presets import match_preset

T = TypeVar("T", bound=ESCModelBase)

LTE_SCALE = __LTE_SCALE__
"""The scale the arbitrary-scale ESC is described with (the top of its x1-x4 training range). For other factors,
call ``descriptor.model.upscale_by(image, factor)``."""

__SHARED_TABLES__

def _unwrap(state_dict: StateDict) -> StateDict:
    # esc_arb (LTE) checkpoints are {"model": {"name", "args", "sd"}}; spandrel unwraps "model" only.
    inner = state_dict.get("sd")
    return inner if isinstance(inner, dict) else state_dict


def _condition(variant: Variant) -> KeyCondition:
    required = KeyCondition.has_all(*variant.keys)
    if not variant.any_of:
        return required
    return KeyCondition.has_all(
        required,
        KeyCondition.has_any(
            *(KeyCondition.has_all(*group) for group in variant.any_of)
        ),
    )


__SHARED_FUNCTIONS__


class _ESCArchitecture(Architecture[T], Generic[T]):
    def __init__(self, cls: type[T]) -> None:
        variant = next(v for v in VARIANTS if v.cls is cls)
        condition = _condition(variant)
        super().__init__(
            id=variant.name, detect=lambda state_dict: condition(_unwrap(state_dict))
        )
        self._cls = cls

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[T]:
        state_dict = _unwrap(state_dict)
        cls, kwargs = infer_architecture(state_dict)
        if cls is not self._cls:
            raise ValueError(
                f"expected a {self._cls.arch_name} state dict, got {cls.arch_name}"
            )
        model: T = cls(**kwargs)  # type: ignore
        scale = LTE_SCALE if model.arbitrary_scale else model.scale
        if scale < 1 or scale != int(scale):
            # ESCRealM with the conv head and pixel-unshuffle returns an image smaller than its input.
            raise ValueError(
                f"{cls.arch_name} with these hyperparameters scales by {scale:g}x, which is not supported"
            )
        return ImageModelDescriptor(
            model,
            state_dict,
            architecture=self,
            purpose="Restoration" if scale == 1 else "SR",
            tags=_tags(model),
            supports_half=model.supports_half,
            supports_bfloat16=model.supports_half,
            scale=int(scale),
            input_channels=3,
            output_channels=3,
            # Any size works (the model pads internally); reflect-padding the image to the window is the official
            # evaluation protocol. The arbitrary-scale model is evaluated unpadded upstream.
            size_requirements=SizeRequirements(
                multiple_of=1 if model.arbitrary_scale else model.window_size
            ),
            tiling=ModelTiling.SUPPORTED,
            call_fn=_render_at_lte_scale if model.arbitrary_scale else None,
        )


class ESCArch(_ESCArchitecture[ESC]):
    def __init__(self) -> None:
        super().__init__(ESC)


class ESCFPArch(_ESCArchitecture[ESCFP]):
    def __init__(self) -> None:
        super().__init__(ESCFP)


class ESCRealArch(_ESCArchitecture[ESCReal]):
    def __init__(self) -> None:
        super().__init__(ESCReal)


class ESCRealMArch(_ESCArchitecture[ESCRealM]):
    def __init__(self) -> None:
        super().__init__(ESCRealM)


class ESCLTEArch(_ESCArchitecture[ESCLTE]):
    def __init__(self) -> None:
        super().__init__(ESCLTE)


__all__ = [
    "ESCArch",
    "ESCFPArch",
    "ESCRealArch",
    "ESCRealMArch",
    "ESCLTEArch",
    "ESC",
    "ESCFP",
    "ESCReal",
    "ESCRealM",
    "ESCLTE",
]
'''

RELEASE = "https://github.com/dslisleedh/ESC/releases/download/1.0.0"

TEST = '''from spandrel.architectures.ESC import (
    ESC,
    ESCFP,
    ESCLTE,
    ESCArch,
    ESCFPArch,
    ESCLTEArch,
    ESCReal,
    ESCRealArch,
    ESCRealM,
    ESCRealMArch,
)

from .util import (
    ModelFile,
    TestImage,
    assert_image_inference,
    assert_loads_correctly,
    assert_size_requirements,
    disallowed_props,
)

TINY = {
    "dim": 16,
    "pdim": 8,
    "n_blocks": 1,
    "conv_blocks": 2,
    "window_size": 8,
    "num_heads": 2,
}


def test_load_ESC():
    assert_loads_correctly(
        ESCArch(),
        lambda: ESC(**TINY),
        lambda: ESC(**TINY, upscaling_factor=2),
        lambda: ESC(**TINY, upscaling_factor=3),
        lambda: ESC(**TINY, upscaling_factor=1),
        lambda: ESC(**{**TINY, "n_blocks": 2, "conv_blocks": 3}),
        lambda: ESC(**{**TINY, "num_heads": 4, "window_size": 4}),
        lambda: ESC(**TINY, kernel_size=7),
        lambda: ESC(**TINY, exp_ratio=2.0),
        lambda: ESC(**TINY, use_ln=True),
    )


def test_load_ESCFP():
    assert_loads_correctly(
        ESCFPArch(),
        lambda: ESCFP(**TINY),
        lambda: ESCFP(**TINY, upscaling_factor=2),
        lambda: ESCFP(**TINY, kernel_size=7),
    )


def test_load_ESCReal():
    assert_loads_correctly(
        ESCRealArch(),
        lambda: ESCReal(**TINY),
        lambda: ESCReal(**TINY, upsampler="dysample"),
        lambda: ESCReal(**TINY, upsampler="dysample", upscaling_factor=2),
        lambda: ESCReal(**TINY, upsampler="nearest+conv-neosr"),
        lambda: ESCReal(**TINY, upsampler="nearest+conv-neosr", upscaling_factor=2),
    )


def test_load_ESCRealM():
    assert_loads_correctly(
        ESCRealMArch(),
        lambda: ESCRealM(**TINY),
        lambda: ESCRealM(**TINY, upsampler="pixelshuffle"),
        lambda: ESCRealM(**TINY, upsampler="pixelshuffledirect"),
        lambda: ESCRealM(**TINY, upsampler="dysample"),
        lambda: ESCRealM(**TINY, upsampler="transpose+conv"),
        lambda: ESCRealM(**TINY, upsampler="conv"),
        lambda: ESCRealM(**TINY, upsampler="nearest+conv", upscaling_factor=3),
        lambda: ESCRealM(**TINY, upsampler="nearest+conv", upscaling_factor=2),
        lambda: ESCRealM(**TINY, upsampler="pixelshuffle", upscaling_factor=1),
        lambda: ESCRealM(**TINY, mid_dim=24),
    )


def test_load_ESCLTE():
    assert_loads_correctly(
        ESCLTEArch(),
        lambda: ESCLTE(**TINY, hidden_dim=32, mlp_hidden=(32, 32)),
        lambda: ESCLTE(**TINY, hidden_dim=16, mlp_hidden=(24,)),
    )


def test_size_requirements():
    file = ModelFile.from_url(
        "__RELEASE__/ESC_light_X2.pth"
    )
    assert_size_requirements(file.load_model())


__SNAPSHOT_TESTS__'''

SNAPSHOT_TEST = '''

def test___NAME__(snapshot):
    file = ModelFile.from_url(
        "__RELEASE__/__FILE__"
    )
    model = file.load_model()
    assert model == snapshot(exclude=disallowed_props)
    assert isinstance(model.model, __CLASS__)
    assert_image_inference(
        file,
        model,
        [TestImage.SR_16, TestImage.SR_32, TestImage.SR_64],
    )
'''

SNAPSHOTS = (("ESC_light_x2", "ESC_light_X2.pth", "ESC"), ("ESC_DIV2K_x4", "ESC_DIV2K_X4.pth", "ESC"),
             ("ESC_FP_x4", "ESC_FP_X4.pth", "ESCFP"), ("ESC_Real_x4", "ESC_Real_X4_GAN.pth", "ESCReal"))
"""The official files tests/test_ESC.py loads and snapshots: (test name, release file, model class)."""
TEST = TEST.replace("__SNAPSHOT_TESTS__", "".join(
    SNAPSHOT_TEST.replace("__NAME__", name).replace("__FILE__", file).replace("__CLASS__", cls)
    for name, file, cls in SNAPSHOTS).lstrip("\n")).replace("__RELEASE__", RELEASE)

def init_module() -> str:
    """ESC/__init__.py: the template above with the descriptor's tables and functions (tags, the LTE call) taken
    from esc_arch.spandrel's source, so spandrel's ESC and ours describe a model the same way (one definition)."""
    import inspect
    import json

    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()  # esc_arch.spandrel imports spandrel, hence torchvision, next to a CPU torch
    from esc_arch import spandrel as ours

    tables = f"_PRESET_TAGS = {json.dumps(ours._PRESET_TAGS)}\n_UPSAMPLER_TAGS = {json.dumps(ours._UPSAMPLER_TAGS)}\n"
    functions = "\n\n".join(inspect.getsource(f) for f in (ours._tags, ours._render_at_lte_scale))
    return (INIT.replace("__LTE_SCALE__", str(ours.LTE_SCALE)).replace("__SHARED_TABLES__", tables)
            .replace("__SHARED_FUNCTIONS__", functions.rstrip("\n")))


TEST_MODEL_FILES = tuple(file for _, file, _ in SNAPSHOTS)
"""The official files tests/test_ESC.py downloads (into spandrel's tests/models/)."""


class UpstreamError(Exception):
    """The checkout is not one this script knows how to edit."""


def generated_arch_files() -> dict[str, str]:
    """``__arch`` file name -> contents: the esc_arch modules with their header, and the LICENSE."""
    files = {}
    for name in ARCH_MODULES:
        source = (ESC_ARCH / f"{name}.py").read_text(encoding="utf-8")
        _check_imports(name, source)
        files[f"{name}.py"] = HEADER.format(name=name) + source
    files["LICENSE"] = LICENSE
    return files


def _check_imports(name: str, source: str) -> None:
    """Refuse a module that imports outside the copied set and spandrel's allowed dependencies."""
    local = set(ARCH_MODULES)
    for match in re.finditer(r"^\s*(?:from\s+(\.*)([\w.]*)\s+import|import\s+([\w.]+))", source, re.MULTILINE):
        dots, module, plain = match.groups()
        if dots:
            top = module.split(".")[0]
            if len(dots) != 1 or top not in local:
                raise UpstreamError(f"esc_arch/{name}.py imports .{module}, which is not part of the generated code")
            continue
        top = (module or plain).split(".")[0]
        if top in ALLOWED_IMPORTS or top in sys.stdlib_module_names or top == "__future__":
            continue
        raise UpstreamError(f"esc_arch/{name}.py imports {top}, which spandrel does not allow")


def write_arch(checkout: Path) -> list[Path]:
    arch_dir = checkout / ARCH_DIR
    (arch_dir / "__arch").mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in generated_arch_files().items():
        written.append(_write(arch_dir / "__arch" / file_name, text))
    written.append(_write(arch_dir / "__init__.py", init_module()))
    return written


def write_tests(checkout: Path) -> Path:
    return _write(checkout / "tests" / "test_ESC.py", TEST)  # formatted and linted as spandrel's ruff 0.5.0 wants


def edit_registry(checkout: Path) -> Path:
    path = checkout / REGISTRY_FILE
    text = path.read_text(encoding="utf-8")
    if "ESC.ESCArch()" not in text:
        imports = re.search(r"from \.\.architectures import \((.*?)\)", text, re.DOTALL)
        if imports is None or "    ESRGAN,\n" not in imports.group(1):
            raise UpstreamError(f"{REGISTRY_FILE}: the architectures import is not where it was expected")
        text = text.replace("    ESRGAN,\n", "    ESC,\n    ESRGAN,\n", 1)
        registry = re.search(r"MAIN_REGISTRY\.add\((.*?)\n\)\n", text, re.DOTALL)
        if registry is None:
            raise UpstreamError(f"{REGISTRY_FILE}: MAIN_REGISTRY.add(...) not found")
        lines = "".join(f"\n    ArchSupport.from_architecture(ESC.{ARCH_CLASSES[i]}())," for i in ARCH_IDS)
        end = registry.end(1)
        text = text[:end] + lines + text[end:]
        path.write_text(text, encoding="utf-8")
    return path


def edit_readme(checkout: Path) -> Path:
    path = checkout / "README.md"
    text = path.read_text(encoding="utf-8")
    if README_LINE not in text:
        anchor = re.search(r"^- \[AuraSR\].*$", text, re.MULTILINE) or re.search(r"^- \[FDAT\].*$", text, re.MULTILINE)
        if anchor is None:
            raise UpstreamError("README.md: the super-resolution list (its AuraSR or FDAT line) was not found")
        text = text[: anchor.end()] + "\n" + README_LINE + text[anchor.end():]
        path.write_text(text, encoding="utf-8")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def generate(checkout: Path, *, tests: bool = True, registry: bool = True) -> list[Path]:
    """Write everything into ``checkout``; returns the files written or edited."""
    checkout = Path(checkout)
    if not (checkout / "libs" / "spandrel" / "spandrel" / "architectures").is_dir():
        raise UpstreamError(f"{checkout}: not a spandrel checkout (no libs/spandrel/spandrel/architectures)")
    written = write_arch(checkout)
    if registry:
        written += [edit_registry(checkout), edit_readme(checkout)]
    if tests:
        written.append(write_tests(checkout))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of https://github.com/chaiNNer-org/spandrel")
    args = parser.parse_args(argv)
    try:
        written = generate(args.checkout)
    except UpstreamError as exc:
        print(f"spandrel_upstream: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.relative_to(args.checkout.resolve()) if path.is_absolute() else path}")
    print(f"next: cd {args.checkout} && pytest tests/test_ESC.py --snapshot-update "
          f"(downloads {', '.join(TEST_MODEL_FILES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
