"""The engine's memory estimate per variant against measured peaks: bytes per LR pixel of an untiled ``upscale``.

Each variant runs ``esc_sr.upscale(model, x, tile=None)`` (fp32, CPU) at two input sizes in fresh processes, twice:
with glibc's mmap threshold fixed, so RSS follows live memory (see ``peak_memory.py``), and as a user runs it, where
:mod:`esc_sr.heap` keeps freed blocks for reuse during the call (the RSS then also holds what the heap kept). The
slope of the peak over the pixel count is the measured working set per pixel, free of weights and libraries.
Reported beside it: the estimate ``esc_sr.memory.bytes_per_input_pixel`` that ``tile='auto'`` decides with, and
its ratio to each (it must stay >= 1: an estimate below the real need would let an untiled run start that does not
fit).

    python -m benchmarks memory_estimate                    # every variant, 64x64 and 128x128 inputs
    python -m benchmarks memory_estimate --variants esc:4 esc_real:4:dysample --sizes 96 160
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .common import RESULTS_DIR, log, parse_args, script_parser, write_results
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


def _slope(variant: str, sizes: tuple[int, int], fixed_allocator: bool) -> tuple[float, list[float]] | str:
    peaks = []
    for size in sizes:
        case = {"workload": "benchmarks.memory_estimate:workload", "device": "cpu", "threads": 1, "warmup": 1, "runs": 1,
                "variant": variant, "size": size}
        result = run_case(case, fixed_allocator=fixed_allocator)
        if "error" in result:
            return result["error"]
        peaks.append(result["peak_mb"] * 2**20)
    return (peaks[1] - peaks[0]) / (sizes[1] ** 2 - sizes[0] ** 2), [round(p / 2**20, 1) for p in peaks]


def measure(variant: str, sizes: tuple[int, int]) -> dict[str, Any]:
    from esc_sr import memory

    row: dict[str, Any] = {"variant": variant, "sizes": list(sizes)}
    model = build(variant)
    estimate = memory.bytes_per_input_pixel(model, torch.float32)
    if model.arbitrary_scale:  # the estimate is per LR pixel of the encoder; the output grows with the factor too
        estimate += 4 * 3 * float(variant.split(":")[1]) ** 2 * 3
    row["estimate_bytes_per_pixel"] = round(estimate)
    for label, fixed in (("", True), ("_heap_policy", False)):
        slope = _slope(variant, sizes, fixed)
        if isinstance(slope, str):
            return {"variant": variant, "error": slope}
        measured, peaks = slope
        row[f"peak_mb{label}"] = peaks
        row[f"measured_bytes_per_pixel{label}"] = round(measured)
        row[f"estimate_over_measured{label}"] = round(estimate / measured, 2)
    return row


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [f"Machine: {machine.get('cpu', '?')}, 1 thread, fp32, untiled `upscale`; measured with the mmap threshold "
             "fixed (live memory) and with the engine's heap policy (what a user's process holds).", "",
             "| variant | measured bytes / LR pixel (live) | with the heap policy | estimate | estimate / measured "
             "(live, heap policy) |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | error: {row['error']} | | | |")
        else:
            lines.append(f"| {row['variant']} | {row['measured_bytes_per_pixel']:,} | "
                         f"{row['measured_bytes_per_pixel_heap_policy']:,} | {row['estimate_bytes_per_pixel']:,} | "
                         f"{row['estimate_over_measured']:.2f}, {row['estimate_over_measured_heap_policy']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, out=RESULTS_DIR / "memory_estimate.json")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--sizes", nargs=2, type=int, default=(64, 128))
    args = parse_args(parser, argv)
    rows = []
    for variant in args.variants:
        row = measure(variant, tuple(args.sizes))
        log(f"{variant}: {row}")
        rows.append(row)
    print(write_results(args.out, rows, markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
