"""Write OpenModelDB entries (``docs/openmodeldb/<id>.json``) for the models embedded in esc-sr.

    python scripts/openmodeldb.py            # (re)write the entries
    python scripts/openmodeldb.py --check    # exit 1 if an entry differs from what would be written

Each entry follows OpenModelDB's model schema (``src/lib/schema.ts`` of OpenModelDB/open-model-database: name,
author, license, tags, description, date, architecture, size, scale, inputChannels, outputChannels, resources,
images, and the optional training fields). The facts come from ``esc_sr.cards`` and the shipped files: size and
SHA-256 of the file, spandrel's tags of its descriptor (OpenModelDB's ``size`` field), the iterations recorded in
the file's metadata. ``tests/test_model_cards.py`` checks that the entries are current.

Before submitting: OpenModelDB has no ``esc`` architecture yet (``data/architectures.json`` needs
``"esc": {"name": "ESC", "input": "image", "compatiblePlatforms": ["pytorch", "onnx"]}``), the download URL must
point at a published copy of the file, and ``images`` needs LR/SR pairs hosted somewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "docs" / "openmodeldb"
REPOSITORY = "https://github.com/esc-sr/esc-sr"
ENTRY_IDS = {"default": "4x-ESC-tiny-bicubic", "real": "4x-ESCRealM-tiny-realworld"}
DATES = {"default": "2026-11-21", "real": "2026-12-07"}  # when each file was first shipped

sys.path.insert(0, str(REPO_ROOT))


def _entry(name: str) -> dict:
    from safetensors import safe_open

    import esc_arch
    from esc_sr import cards
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import esc_arch.spandrel as esc_spandrel

    card = cards.EMBEDDED_CARDS[name]
    path = esc_arch.EMBEDDED_MODELS[name]
    data = path.read_bytes()
    with safe_open(str(path), "pt") as handle:
        metadata = json.loads(handle.metadata().get("esc_sr", "{}"))
    description = metadata.get("description")
    iterations = description.get("iterations") if isinstance(description, dict) else None
    model = esc_arch.load_model(name)
    descriptor = esc_spandrel.describe(model)
    relative = path.relative_to(REPO_ROOT).as_posix()
    text = (
        f"{card.variant}, x{card.scale}, {card.parameters:,} parameters, embedded in esc-sr "
        f"(`esc_arch.load_model(\"{name}\")`, `esc-sr upscale -m {name}`).\n\n"
        f"Training data: {card.training_data}.\nDegradation: {card.degradation}.\n"
        + (f"\n**Status: {card.status}.**\n" if card.status else "")
        + f"\nModel card: {REPOSITORY}/blob/main/{card.card}"
    )
    entry = {
        "name": f"ESC-SR {name} x{card.scale}",
        "author": "esc-sr",
        "license": card.license,
        "tags": ["photo", "general-upscaler"],
        "description": text,
        "date": DATES[name],
        "architecture": "esc",
        "size": list(descriptor.tags),
        "scale": card.scale,
        "inputChannels": descriptor.input_channels,
        "outputChannels": descriptor.output_channels,
        "resources": [{
            "platform": "pytorch",
            "type": "safetensors",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "urls": [f"{REPOSITORY}/raw/main/{relative}"],
        }],
        "images": [],
        "trainingBatchSize": 8,
        "trainingHRSize": 256 if name == "real" else 192,
        "trainingOTF": name == "real",
        "dataset": card.training_data,
    }
    if iterations is not None:
        entry["trainingIterations"] = int(iterations)
    return entry


def entries() -> dict[str, str]:
    """File name -> the JSON text to write, for every embedded model."""
    from esc_sr import cards

    return {f"{ENTRY_IDS[name]}.json": json.dumps(_entry(name), indent=4, ensure_ascii=False) + "\n"
            for name in cards.EMBEDDED_CARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if an entry is out of date")
    args = parser.parse_args(argv)
    stale = []
    for file_name, text in entries().items():
        target = OUT_DIR / file_name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(file_name)
        if not args.check:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(REPO_ROOT)}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/openmodeldb.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
