"""The default path (``tile='auto'``) against an untiled run, on images that fit in memory.

``esc_sr.upscale(model, image)`` with its defaults should cost what the model costs: on an image that fits,
``tile='auto'`` runs it untiled. Each case alternates the two calls (auto, untiled, auto, ...) so that load
changes hit both alike, and reports the ratio of medians (target: <= 1.10).

    python -m benchmarks auto_tile                       # default model 500x480 and 1920x1080, esc x4 500x480
    python -m benchmarks auto_tile --cases default:500x480 --runs 5
"""

from __future__ import annotations

import statistics

import torch

import esc_arch
import esc_sr

from .common import RESULTS_DIR, load_average, log, parse_args, parse_size, script_parser, time_once, write_payload

DEFAULT_CASES = ("default:500x480", "default:1920x1080", "esc:500x480")


def _model(name: str) -> torch.nn.Module:
    model = esc_arch.load_model("default") if name == "default" else esc_arch.PRESETS[name](4)
    return esc_arch.fuse(model.eval())


def measure(case: str, runs: int) -> dict:
    name, size = case.split(":")
    height, width = parse_size(size)
    model = _model(name)
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    calls = {"auto": lambda: esc_sr.upscale(model, image), "untiled": lambda: esc_sr.upscale(model, image, tile=None)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(runs):
        for key, call in calls.items():
            times[key].append(time_once(call, torch.device("cpu")))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"case": case, "times_ms": times, "median_ms": median, "auto_over_untiled": median["auto"] / median["untiled"]}


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, runs=3, out=RESULTS_DIR / "auto_tile.json")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="MODEL:HEIGHTxWIDTH (MODEL: default or a preset)")
    args = parse_args(parser, argv)
    load_before = load_average()
    rows = []
    for case in args.cases:
        row = measure(case, args.runs)
        log(f"{case}: auto {row['median_ms']['auto'] / 1e3:.2f} s, untiled {row['median_ms']['untiled'] / 1e3:.2f} s, "
            f"ratio {row['auto_over_untiled']:.3f}")
        rows.append(row)
    write_payload(args.out, {"runs": args.runs, "load_average": [load_before, load_average()], "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
