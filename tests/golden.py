"""Access to the golden fixtures in ../shared/fixtures/golden (produced by the official code)."""

from __future__ import annotations

import json
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "golden"


def golden_cases() -> list[dict]:
    """The cases of cases.json (each: id, constructor_kwargs, checkpoint, tensors, runs ...)."""
    return json.loads((GOLDEN_DIR / "cases.json").read_text())["cases"]


def checkpoint_path(case: dict) -> Path:
    return GOLDEN_DIR / case["checkpoint"]["file"]


def tensors(case: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_DIR / case["tensors"]["file"]))
