"""Ship a BasicSR training checkpoint as the embedded default model, measured and described.

    python scripts/export_default_model.py experiments/ESC_tiny_x4_campaign/models/net_g_10000.pth \\
        --iterations 10000 --iterations-before 42900 --previous-curve --log experiments/ESC_tiny_x4_campaign/train_*.log

1. writes ``esc_arch/weights/esc_default_x4.safetensors``: the EMA weights in fp16, with esc-sr metadata;
2. measures the shipped file (reloaded from disk, so fp16 rounding included) on Set5 and Set14 with the paper's
   protocol (``basicsr_plugin.evaluation``; ``python test.py -opt options/default_model/test_ESC_tiny_x4.yml``
   gives the same numbers), and bicubic beside it;
3. stores those numbers, the iteration count and the validation curves (read from the training logs) in the file's
   metadata (``description``), which the tests read back;
4. draws the curves to ``esc_arch/weights/validation_curve.png`` for the model card.

Set5/Set14 are only measured here. Since the campaign's fourth session training validates on the 20 training photos
held out from it (``scripts/recipe_split.py``; ``held_out_curve``) and the checkpoint shipped is the end of the
session's last whole cycle (see the campaign's options); the first three sessions validated and chose on Set5
(``validation_curve``, kept as their record; ``--validated-on Set5`` reads such logs).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import esc_arch
import esc_sr
from esc_arch.checkpoint import DEFAULT_MODEL_FILE, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO.parent / "shared" / "data" / "benchmark"
CURVE_PNG = DEFAULT_MODEL_FILE.with_name("validation_curve.png")


def validation_curve(logs: list[Path], offset: int) -> list[tuple[int, float]]:
    """(total iteration, validation PSNR) of every validation in BasicSR training logs, in order; a resumed run's
    repeated iterations keep the latest value."""
    points: dict[int, float] = {}
    for log in logs:
        iteration = 0
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if match := re.search(r"iter:\s*([\d,]+)", line):
                iteration = int(match.group(1).replace(",", ""))
            elif match := re.search(r"# psnr: ([\d.]+)", line):
                points[offset + iteration] = float(match.group(1))
    return sorted(points.items())


CURVES = {"held-out": "held_out_curve", "Set5": "validation_curve"}  # what the logs validated on -> metadata key
LABELS = {"held_out_curve": "20 held-out training photos (session 4 on)",
          "validation_curve": "Set5 (sessions 1-3 validated and chose on it)"}


def plot(curves: dict[str, list[tuple[int, float]]], quality: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esc_sr.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=100)
    for key, curve in curves.items():
        if curve:
            ax.plot([i for i, _ in curve], [p for _, p in curve], marker="o", markersize=3, label=LABELS[key])
    ax.axhline(quality["set5"]["bicubic_psnr"], color="gray", linestyle=":", label="bicubic (Set5)")
    ax.axhline(31.0, color="tab:red", linestyle="--", linewidth=1, label="Set5 target 31.0 dB")
    ax.set_xlabel("training iterations (batch 8, LR patch 48)")
    ax.set_ylabel("x4 PSNR-Y of the EMA weights (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    with atomic_write(out) as temp:
        fig.savefig(temp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="BasicSR net_g_*.pth (params_ema is used)")
    parser.add_argument("--log", nargs="*", type=Path, default=[], help="BasicSR training logs (for the curve)")
    parser.add_argument("--iterations", type=int, required=True, help="iterations of this checkpoint in this run")
    parser.add_argument("--iterations-before", type=int, default=0, help="iterations of earlier runs it started from")
    parser.add_argument("--previous-curve", action="store_true", help="keep the curves stored in the shipped file")
    parser.add_argument("--validated-on", choices=sorted(CURVES), default="held-out",
                        help="what the logs' validation ran on (default: the held-out training photos)")
    args = parser.parse_args(argv)
    from basicsr_plugin.evaluation import evaluate_folder  # BasicSR's metrics and MATLAB resize

    model = esc_arch.load_model(args.checkpoint)  # params_ema preferred
    esc_arch.set_attention_backend(model, "sdpa")
    previous = read_checkpoint(DEFAULT_MODEL_FILE)[1].get("description", {}) if args.previous_curve else {}
    esc_sr.save_model(model, DEFAULT_MODEL_FILE, half=True)
    shipped = esc_arch.load_model(DEFAULT_MODEL_FILE)
    quality = {name.lower(): evaluate_folder(shipped, BENCHMARKS / name, scale=4) for name in ("Set5", "Set14")}
    curves = {key: [tuple(p) for p in previous.get(key, [])] for key in CURVES.values()}
    logged = CURVES[args.validated_on]
    curves[logged] = sorted(dict(curves[logged] + validation_curve(args.log, args.iterations_before)).items())
    description = {
        "iterations": args.iterations_before + args.iterations,
        "training_data": "shared/data/train: BSDS200 + SunHays80 (from session 4: 260 trained on, 20 held out)",
        "quality": quality,  # mean PSNR/SSIM on Y, crop 4, MATLAB bicubic LR
        **{key: curve for key, curve in curves.items() if curve},
    }
    esc_sr.save_model(shipped, DEFAULT_MODEL_FILE, half=True, description=description)
    plot(curves, quality, CURVE_PNG)
    size = DEFAULT_MODEL_FILE.stat().st_size / 1e3
    print(f"wrote {DEFAULT_MODEL_FILE} ({size:.0f} kB), {description['iterations']} iterations")
    for name, q in quality.items():
        print(f"  {name}: {q['psnr']:.2f} dB / {q['ssim']:.4f} (bicubic {q['bicubic_psnr']:.2f} / {q['bicubic_ssim']:.4f})")
    print(f"wrote {CURVE_PNG}")


if __name__ == "__main__":
    main()
