"""The engine's memory estimate per variant against measured peaks: bytes per LR pixel of an untiled ``upscale``.

Each variant runs ``esc_sr.upscale(model, x, tile=None)`` (fp32, CPU) at two input sizes in fresh processes (glibc's
mmap threshold fixed, so RSS follows live memory: see ``peak_memory.py``); the slope of the peak over the pixel
count is the measured working set per pixel, free of weights and libraries. Reported beside it: the estimate
``esc_sr.memory.bytes_per_input_pixel`` that ``tile='auto'`` decides with, and their ratio (it must stay >= 1:
an estimate below the real need would let an untiled run start that does not fit).

    python -m benchmarks.memory_estimate                    # every variant, 64x64 and 128x128 inputs
    python -m benchmarks.memory_estimate --variants esc:4 esc_real:4:dysample --sizes 96 160
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from .common import RESULTS_DIR, log, write_results
from .peak_memory import run_case

# preset:scale[:upsampler or attention backend]
DEFAULT_VARIANTS = (
    "esc_tiny:4", "esc:4", "esc:4:naive", "esc_light:2", "esc_fp:4", "esc_xl:4", "esc_real:4", "esc_real:4:dysample",
    "esc_realm:2:pixelshuffle", "esc_lte:4",
)


def build(variant: str) -> torch.nn.Module:
    import esc_arch

    preset, scale, *extra = variant.split(":")
    kwargs: dict[str, Any] = {}
    if extra and extra[0] in ("naive", "flex", "sdpa"):
        kwargs["attn_type"] = extra[0]
    elif extra:
        kwargs["upsampler"] = extra[0]
    factory = esc_arch.PRESETS[preset]
    model = factory(**kwargs) if preset == "esc_lte" else factory(int(scale), **kwargs)
    return esc_arch.fuse(model.eval())


def workload(case: dict, device: torch.device):
    import esc_sr

    model = build(case["variant"])
    x = torch.rand(1, 3, case["size"], case["size"], generator=torch.Generator().manual_seed(0))
    outscale = float(case["variant"].split(":")[1]) if model.arbitrary_scale else None
    return (lambda: esc_sr.upscale(model, x, tile=None, outscale=outscale)), {"variant": case["variant"], "size": case["size"]}


def measure(variant: str, sizes: tuple[int, int]) -> dict[str, Any]:
    from esc_sr import memory

    peaks = []
    for size in sizes:
        case = {"workload": "benchmarks.memory_estimate:workload", "device": "cpu", "threads": 1, "warmup": 1, "runs": 1,
                "variant": variant, "size": size}
        result = run_case(case, fixed_allocator=True)
        if "error" in result:
            return {"variant": variant, "error": result["error"]}
        peaks.append(result["peak_mb"] * 2**20)
    pixels = [s * s for s in sizes]
    measured = (peaks[1] - peaks[0]) / (pixels[1] - pixels[0])
    model = build(variant)
    estimate = memory.bytes_per_input_pixel(model, torch.float32)
    if model.arbitrary_scale:  # the estimate is per LR pixel of the encoder; the output grows with the factor too
        estimate += 4 * 3 * float(variant.split(":")[1]) ** 2 * 3
    return {"variant": variant, "sizes": list(sizes), "peak_mb": [round(p / 2**20, 1) for p in peaks],
            "measured_bytes_per_pixel": round(measured), "estimate_bytes_per_pixel": round(estimate),
            "estimate_over_measured": round(estimate / measured, 2)}


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [f"Machine: {machine.get('cpu', '?')}, 1 thread, fp32, untiled `upscale`.", "",
             "| variant | measured bytes / LR pixel | estimate | estimate / measured |", "|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | error: {row['error']} | | |")
        else:
            lines.append(f"| {row['variant']} | {row['measured_bytes_per_pixel']:,} | {row['estimate_bytes_per_pixel']:,} | "
                         f"{row['estimate_over_measured']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--sizes", nargs=2, type=int, default=(64, 128))
    parser.add_argument("--out", default=str(RESULTS_DIR / "memory_estimate.json"))
    args = parser.parse_args(argv)
    rows = []
    for variant in args.variants:
        row = measure(variant, tuple(args.sizes))
        log(f"{variant}: {row}")
        rows.append(row)
    print(write_results(args.out, rows, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
