"""Hold out 20 of the 280 training photos for recipe comparisons: ``experiments/recipe_split/{train,val}``.

    python scripts/recipe_split.py
    nice python train.py -opt options/default_model/ESC_tiny_x4_recipe.yml [--force_yml ...]

The benchmark sets (Set5, Set14, ...) must not choose the recipe, so the short runs that compare recipes
(``options/default_model/ESC_tiny_x4_recipe.yml``) validate on every 14th photo of BSDS200 + SunHays80 (sorted by
name) and train on the other 260. The folders hold symbolic links to ``../shared/data/train``; nothing is copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO.parent / "shared" / "data" / "train" / name for name in ("BSDS200", "SunHays80")]
TARGET = REPO / "experiments" / "recipe_split"
EVERY = 14


def main() -> int:
    photos = sorted(p for folder in SOURCES for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        print(f"no photos under {', '.join(map(str, SOURCES))}", file=sys.stderr)
        return 1
    for part in ("train", "val"):
        folder = TARGET / part
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for i, photo in enumerate(photos):
        part = "val" if i % EVERY == EVERY - 1 else "train"
        (TARGET / part / f"{photo.parent.name}_{photo.name}").symlink_to(photo)
    counts = {part: len(list((TARGET / part).iterdir())) for part in ("train", "val")}
    print(f"{TARGET}: {counts['train']} training photos, {counts['val']} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
