"""Where the tests find ../shared (beside the checkout, in CI too), and the golden fixtures in it.

The one place the path is computed.  ``ESC_SR_GOLDEN=DIR`` takes the golden fixtures (``cases.json`` and its files)
from ``DIR`` instead, e.g. the subset ``python -m benchmarks gpu_check --pack-golden DIR`` packs for a device machine,
where ../shared is not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
GOLDEN_FROM_ENV = bool(os.environ.get("ESC_SR_GOLDEN"))
# produced by the official code (and neosr, traiNNer-redux)
GOLDEN_DIR = Path(os.environ["ESC_SR_GOLDEN"]).resolve() if GOLDEN_FROM_ENV else SHARED_DIR / "fixtures" / "golden"
DATA_DIR = SHARED_DIR / "data"  # HR images: benchmark/ (evaluation only) and train/


def golden_cases() -> list[dict]:
    """The cases of cases.json (each: id, constructor_kwargs, checkpoint, tensors, runs ...)."""
    return json.loads((GOLDEN_DIR / "cases.json").read_text())["cases"]


def checkpoint_path(case: dict) -> Path:
    return GOLDEN_DIR / case["checkpoint"]["file"]


def tensors(case: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_DIR / case["tensors"]["file"]))
