"""Where the tests find ../shared (beside the checkout, in CI too), and the golden fixtures in it.

The one place the path is computed; ``conftest.py`` offers the same folders as fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
GOLDEN_DIR = SHARED_DIR / "fixtures" / "golden"  # produced by the official code (and neosr, traiNNer-redux)
DATA_DIR = SHARED_DIR / "data"  # HR images: benchmark/ (evaluation only) and train/


def golden_cases() -> list[dict]:
    """The cases of cases.json (each: id, constructor_kwargs, checkpoint, tensors, runs ...)."""
    return json.loads((GOLDEN_DIR / "cases.json").read_text())["cases"]


def checkpoint_path(case: dict) -> Path:
    return GOLDEN_DIR / case["checkpoint"]["file"]


def tensors(case: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_DIR / case["tensors"]["file"]))
