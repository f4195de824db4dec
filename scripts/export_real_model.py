"""Ship a checkpoint of the real-world campaign as the embedded model ``real``, measured and described.

    python scripts/export_real_model.py experiments/ESC_real_tiny_x4_campaign/models/net_g_2000.pth \\
        --iterations 2000 --iterations-before 500 --log experiments/ESC_real_tiny_x4_campaign/train_*.log

1. writes ``esc_arch/weights/esc_real_x4.safetensors``: the EMA weights in fp16, with esc-sr metadata;
2. measures the shipped file (reloaded, fp16 rounding included) with ``benchmarks.real_world`` (the 20 held-out
   training photos, degraded web / camera / clean; no benchmark set), bicubic beside it;
3. stores the numbers, the iterations and the validation curves (from the training logs: the held-out photos'
   central crops, degraded by the campaign's fixed pipelines) in the file's metadata (``description``), which the
   tests read back, and draws the curves to ``esc_arch/weights/real_validation_curve.png``.

Which checkpoint ships is the campaign's rule (the last one of the session), not a score.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import esc_arch  # noqa: E402
import esc_sr  # noqa: E402
from esc_arch.checkpoint import EMBEDDED_MODELS, read_checkpoint  # noqa: E402

TARGET = EMBEDDED_MODELS["real"]
CURVE_PNG = TARGET.with_name("real_validation_curve.png")


def validation_curves(logs: list[Path], offset: int) -> dict[str, list[tuple[int, float]]]:
    """Per validation set (web, camera, clean): (total iteration, PSNR-Y) from BasicSR training logs."""
    curves: dict[str, dict[int, float]] = {}
    for log in logs:
        iteration, dataset = 0, None
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if match := re.search(r"iter:\s*([\d,]+)", line):
                iteration = int(match.group(1).replace(",", ""))
            elif match := re.search(r"Validation real_val_(\w+)", line):
                dataset = match.group(1)
            elif (match := re.search(r"# psnr: ([\d.]+)", line)) and dataset:
                curves.setdefault(dataset, {})[offset + iteration] = float(match.group(1))
    return {name: sorted(points.items()) for name, points in curves.items()}


def validation_bicubic() -> dict[str, float]:
    """Bicubic's PSNR-Y on the campaign's validation inputs (experiments/real_val), for the curves' reference lines."""
    import cv2
    import numpy as np

    from benchmarks.real_world import bicubic, score

    result = {}
    for kind in ("web", "camera", "clean"):
        scores = []
        for gt_path in sorted((REPO / "experiments" / "real_val" / kind / "gt").glob("*.png")):
            hr, lr = (cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in (gt_path, gt_path.parents[1] / "lq" / gt_path.name))
            scores.append(score(bicubic(lr), hr)[0])
        if scores:
            result[kind] = float(np.mean(scores))
    return result


def plot(curves: dict[str, list[tuple[int, float]]], reference: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esc_sr.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=100)
    for name, curve in curves.items():
        line, = ax.plot([i for i, _ in curve], [p for _, p in curve], marker="o", markersize=3, label=f"{name} inputs")
        if name in reference:
            ax.axhline(reference[name], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("training iterations (batch 8, LR patch 48)")
    ax.set_ylabel("x4 PSNR-Y, 20 held-out crops (dB)")
    ax.set_title("dotted: bicubic on the same inputs", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(out) as temp:
        fig.savefig(temp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="BasicSR net_g_*.pth (params_ema is used)")
    parser.add_argument("--log", nargs="*", type=Path, default=[], help="BasicSR training logs (for the curves)")
    parser.add_argument("--iterations", type=int, required=True, help="iterations of this checkpoint in this run")
    parser.add_argument("--iterations-before", type=int, default=0, help="iterations of earlier runs it started from")
    parser.add_argument("--previous-curve", action="store_true", help="keep the curves stored in the shipped file")
    parser.add_argument("--seconds-per-iteration", type=float, default=None, help="the run's median, for the card")
    args = parser.parse_args(argv)
    from benchmarks import real_world

    previous = read_checkpoint(TARGET)[1].get("description", {}) if args.previous_curve and TARGET.exists() else {}
    esc_sr.save_model(esc_arch.load_model(args.checkpoint), TARGET, half=True)
    real_world.main(["--models", "real", "--out", str(REPO / "benchmarks" / "results" / "real_world_shipped.json")])
    import json

    measured = json.loads((REPO / "benchmarks" / "results" / "real_world_shipped.json").read_text())["results"]
    quality = {"bicubic": measured["bicubic"], "real": measured["real"]}
    curves = {name: [tuple(p) for p in points] for name, points in previous.get("curves", {}).items()}
    for name, points in validation_curves(args.log, args.iterations_before).items():
        curves[name] = sorted(dict(curves.get(name, []) + points).items())
    description = {
        "iterations": args.iterations_before + args.iterations,
        "training_data": "shared/data/train: BSDS200 + SunHays80, 260 trained on, 20 held out",
        "degradation": "Real-ESRGAN second order (options/real_model/ESC_real_tiny_x4_campaign.yml)",
        "quality": quality,  # PSNR-Y / SSIM-Y, crop 4, benchmarks/real_world.py
        "curves": curves,
        "validation_bicubic": validation_bicubic(),
        "seconds_per_iteration": args.seconds_per_iteration,
    }
    shipped = esc_arch.load_model(TARGET)
    esc_sr.save_model(shipped, TARGET, half=True, description=description)
    plot(curves, description["validation_bicubic"], CURVE_PNG)
    print(f"wrote {TARGET} ({TARGET.stat().st_size / 1e3:.0f} kB), {description['iterations']} iterations")
    for kind in ("web", "camera", "clean"):
        print(f"  {kind}: {quality['real'][kind]['psnr']:.2f} / {quality['real'][kind]['ssim']:.3f} "
              f"(bicubic {quality['bicubic'][kind]['psnr']:.2f} / {quality['bicubic'][kind]['ssim']:.3f})")
    print(f"wrote {CURVE_PNG}")


if __name__ == "__main__":
    main()
