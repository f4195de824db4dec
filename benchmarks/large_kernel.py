"""The shared large kernel by FFT (``esc_runtime.spectral``) against the direct convolutions, on CPU.

Two parts, each interleaved in one process (every round runs both sides, the order alternating), minima and
medians of the rounds:

* **the correlation alone**: ``F.conv2d(x, kernel, padding=6)`` plus the per-sample depthwise 3x3 (what the model
  runs without the path) against ``SpectralKernel.correlate``, on the channels-last slice the model passes, for
  ESC's 16 channels at 180x320, the default model's 8 at 480x512 and ESC-XL's 48 at 180x320; with each side's max
  abs error against a float64 reference;
* **whole forward passes** of the golden ESC x4 at 180x320 and the embedded default model at 480x512, the path
  switched on and off between calls (what ``ESC_SR_FFT=0`` does for a process), under :mod:`esc_sr.heap`'s
  allocator policy as ``upscale`` runs them; with the two outputs' max abs difference.

    python -m benchmarks large_kernel                       # results/large_kernel.json and .md
    python -m benchmarks large_kernel --rounds 3 --threads 1
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .common import GOLDEN_DIR, RESULTS_DIR, log, parse_args, parse_size, script_parser, write_results

GOLDEN_ESC = GOLDEN_DIR / "esc_x4.ckpt.pth"
CORRELATIONS = [("esc", 16, (180, 320)), ("default model", 8, (480, 512)), ("esc_xl", 48, (180, 320))]


def _interleaved(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _row(what: str, times: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
    direct, fft = times["direct"], times["fft"]
    return {
        "what": what, **extra,
        "direct_ms": {"min": 1e3 * min(direct), "median": 1e3 * statistics.median(direct)},
        "fft_ms": {"min": 1e3 * min(fft), "median": 1e3 * statistics.median(fft)},
        "fft_over_direct": {"min": min(fft) / min(direct), "median": statistics.median(fft) / statistics.median(direct)},
    }


def correlation(name: str, channels: int, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    from esc_runtime import spectral
    from esc_arch.layers import per_sample_depthwise_conv

    generator = torch.Generator().manual_seed(0)
    full = torch.randn(1, 4 * channels, *size, generator=generator).contiguous(memory_format=torch.channels_last)
    x = full[:, :channels]
    kernel = torch.randn(channels, channels, 13, 13, generator=generator) * 0.05
    dynamic = torch.randn(1, channels, 3, 3, generator=generator) * 0.1
    out = torch.empty_like(full)[:, :channels]

    def direct(x=x, kernel=kernel, dynamic=dynamic):
        return F.conv2d(x, kernel, padding=6) + per_sample_depthwise_conv(x, dynamic, padding=1)

    with torch.inference_mode():
        prepared = spectral.SpectralKernel(kernel)
        reference = direct(x.double(), kernel.double(), dynamic.double())
        errors = {"direct": (direct().double() - reference).abs().max().item(),
                  "fft": (prepared.correlate(x, dynamic, out=out).double() - reference).abs().max().item()}
        times = _interleaved({"direct": direct, "fft": lambda: prepared.correlate(x, dynamic, out=out)}, rounds)
    return _row(f"correlation, {name}", times, channels=channels, size=list(size), block=prepared.block,
                max_abs_error_vs_float64=errors, output_abs_max=reference.abs().max().item())


def forward(name: str, model: torch.nn.Module, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    from esc_runtime import spectral
    from esc_sr import heap

    real = spectral.enabled
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))

    def run(on: bool) -> torch.Tensor:
        spectral.enabled = real if on else (lambda: False)
        try:
            return model(x)
        finally:
            spectral.enabled = real

    with torch.inference_mode(), heap.reusing_freed_memory():
        difference = (run(True) - run(False)).abs().max().item()  # the first calls: warm-up as well
        times = _interleaved({"direct": lambda: run(False), "fft": lambda: run(True)}, rounds)
    return _row(f"forward, {name}", times, size=list(size), max_abs_difference=difference)


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# The shared large kernel: FFT against direct convolutions (CPU)", "",
        f"Machine: {machine.get('cpu')}, {machine.get('logical_cpus')} CPUs; torch {machine.get('torch')}, "
        f"{machine.get('torch_threads')} threads; load average at start {machine.get('load_average_at_start')}.", "",
        "| what | size | direct (ms, min / median) | FFT (ms, min / median) | FFT / direct (min / median) | accuracy |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        d, f, r = row["direct_ms"], row["fft_ms"], row["fft_over_direct"]
        if "max_abs_error_vs_float64" in row:
            e = row["max_abs_error_vs_float64"]
            accuracy = f"vs float64: direct {e['direct']:.1e}, FFT {e['fft']:.1e} (outputs up to {row['output_abs_max']:.1f})"
        else:
            accuracy = f"outputs differ by {row['max_abs_difference']:.1e}"
        lines.append(f"| {row['what']} | {row['size'][0]}×{row['size'][1]} | {d['min']:.1f} / {d['median']:.1f} | "
                     f"{f['min']:.1f} / {f['median']:.1f} | {r['min']:.2f}× / {r['median']:.2f}× | {accuracy} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, threads=None, out=RESULTS_DIR / "large_kernel.json")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per comparison (default 9)")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="one size for every row instead of each row's own (a quick run)")
    args = parse_args(parser, argv)

    import esc_arch

    rows = []
    for name, channels, size in CORRELATIONS:
        rows.append(correlation(name, channels, args.size or size, args.rounds))
        log(f"{rows[-1]['what']}: FFT / direct {rows[-1]['fft_over_direct']['median']:.2f}× (median)")
    models = [("default model", esc_arch.load_model("default"), (480, 512))]
    if GOLDEN_ESC.is_file():
        models.insert(0, ("golden esc ×4", esc_arch.load_model(GOLDEN_ESC), (180, 320)))
    else:
        log(f"no golden ESC checkpoint at {GOLDEN_ESC}: its forward row is skipped")
    for name, model, size in models:
        rows.append(forward(name, model.eval(), args.size or size, max(2, args.rounds // 2)))
        log(f"{rows[-1]['what']}: FFT / direct {rows[-1]['fft_over_direct']['median']:.2f}× (median)")
    print(write_results(args.out, rows, markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
