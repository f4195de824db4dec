"""The real-model campaign's validation set: the 20 held-out training photos, degraded three fixed ways.

    python scripts/recipe_split.py        # first: experiments/recipe_split/{train,val}
    python scripts/real_val_set.py        # experiments/real_val/{web,camera,clean}/{gt,lq}/*.png

Each held-out photo's central 256x256 crop is the HR image; its LR inputs come from ``benchmarks.degradations``
with a seed fixed per photo and kind, so every session validates on the same pixels. No benchmark set is involved.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.degradations import KINDS, center_crop, degrade, modcrop  # noqa: E402

SOURCE = REPO / "experiments" / "recipe_split" / "val"
TARGET = REPO / "experiments" / "real_val"
CROP = 256


def main() -> int:
    photos = sorted(SOURCE.glob("*")) if SOURCE.is_dir() else []
    if not photos:
        print(f"no held-out photos in {SOURCE}: run scripts/recipe_split.py first", file=sys.stderr)
        return 1
    for k, kind in enumerate(KINDS):
        for part in ("gt", "lq"):
            (TARGET / kind / part).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(photos):
            image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
            if image is None:
                print(f"{photo}: not a readable image", file=sys.stderr)
                return 1
            hr = modcrop(center_crop(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), CROP))
            lq = degrade(hr, kind, seed=1000 * k + i)
            name = photo.stem + ".png"
            cv2.imwrite(str(TARGET / kind / "gt" / name), cv2.cvtColor(hr, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(TARGET / kind / "lq" / name), cv2.cvtColor(lq, cv2.COLOR_RGB2BGR))
    print(f"{TARGET}: {len(photos)} photos x {len(KINDS)} degradations ({', '.join(KINDS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
