"""Half precision against full precision: PSNR of ``upscale`` in fp16 / bf16 vs fp32 on real images.

    python -m benchmarks bench_precision                                  # golden ESC x4 weights, Set5
    python -m benchmarks bench_precision --model ESC_DIV2K_X4 --device cuda

The LR inputs are the Set5 HR images downscaled x4 (Pillow bicubic, after cropping to a multiple of 4);
each is upscaled untiled in fp32 and in each half precision the device runs, and the 8-bit outputs are
compared (PSNR over RGB, peak 255; "inf" = identical). Needs ../shared (the reference data) for the
default model and images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .common import GOLDEN_DIR, RESULTS_DIR, SHARED_DIR, log, machine_info, parse_args, pick_device, script_parser, write_payload

DEFAULT_MODEL = GOLDEN_DIR / "esc_x4.ckpt.pth"
DEFAULT_IMAGES = SHARED_DIR / "data" / "benchmark" / "Set5"


def psnr_8bit(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from esc_sr import engine
    from esc_sr.cli import load_cli_model

    parser = script_parser(__doc__, device="cpu", out=RESULTS_DIR / "bench_precision.json")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    args = parse_args(parser, argv)

    device = pick_device(args.device)
    model = load_cli_model(args.model)
    scale = model.scale
    rows = []
    for path in sorted(args.images.glob("*.png")):
        hr = Image.open(path).convert("RGB")
        w, h = hr.size[0] // scale * scale, hr.size[1] // scale * scale
        lr = np.asarray(hr.crop((0, 0, w, h)).resize((w // scale, h // scale), Image.BICUBIC))
        log(f"{path.name}: {lr.shape[1]}x{lr.shape[0]}")
        full = engine.upscale(model, lr, tile=None, device=device, precision="fp32")
        row = {"image": path.name, "lr": f"{lr.shape[1]}x{lr.shape[0]}"}
        for precision in args.precisions:
            try:
                half = engine.upscale(model, lr, tile=None, device=device, precision=precision)
            except engine.EngineError as exc:
                row[precision] = f"unsupported: {exc}"
                continue
            row[precision] = round(psnr_8bit(half, full), 2)
            row[precision + "_max_abs_8bit"] = int(np.abs(half.astype(int) - full.astype(int)).max())
        rows.append(row)

    write_payload(args.out, {"model": args.model, "rows": rows}, machine_info(device))
    print(f"PSNR of half-precision output vs fp32 output (8-bit RGB), {Path(args.model).name}, on {device}\n")
    print("| image | LR size | " + " | ".join(f"{p} PSNR (max abs diff)" for p in args.precisions) + " |")
    print("|---|---|" + "---:|" * len(args.precisions))
    for row in rows:
        cells = [
            f"{row[p]} dB ({row[p + '_max_abs_8bit']}/255)" if isinstance(row[p], float) else str(row[p])
            for p in args.precisions
        ]
        print(f"| {row['image']} | {row['lr']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
