"""Turn a results file into the things people read: target checks, markdown tables and the teaser plot.

Everything here is derived from the JSON that ``run_all.py`` writes; nothing is measured or typed in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from esc_sr.atomic import atomic_write

from .common import write_text_atomic

README_BEGIN = "<!-- BEGIN GENERATED RESULTS (benchmarks/run_all.py; do not edit by hand) -->"
README_END = "<!-- END GENERATED RESULTS -->"


# ------------------------------------------------------------------------------------------------ targets
def _row(rows: list[dict[str, Any]], *, key: str | None = None, name: str | None = None, default: bool = False):
    for row in rows:
        if "error" in row:
            continue
        if key is not None and row.get("key") == key:
            return row
        if name is not None and row.get("model") == name and (not default or row.get("default_backend")):
            return row
    return None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios from this run: each with its value, threshold and verdict."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, threshold: float, detail: str) -> None:
        targets.append({"target": name, "value": None if value is None else round(value, 2), "threshold": threshold,
                        "met": None if value is None else value >= threshold, "detail": detail})

    for table_name in ("model_table", "paper_protocol"):
        table = results.get(table_name) or {}
        rows = table.get("rows", [])
        for size in sorted({r["size"] for r in rows}):
            at_size = [r for r in rows if r["size"] == size]
            esc = _row(at_size, name="ESC", default=True)
            naive = _row(at_size, key="ESC[naive]")
            for peer in ("SwinIR-light", "ATD-light"):
                other = _row(at_size, name=peer)
                if other is None:  # not measured at this size (CPU paper-protocol table)
                    continue
                value = other["median_ms"] / esc["median_ms"] if esc else None
                add(f"ESC x4 faster than {peer} x4 ({size})", value, 1.0,
                    f"{peer} latency / ESC[{esc['backend'] if esc else '?'}] latency")
            if esc and naive and esc is not naive:
                add(f"default ESC path >= 2x faster than naive ({size})", naive["median_ms"] / esc["median_ms"], 2.0,
                    f"ESC[naive] latency / ESC[{esc['backend']}] latency")
    attention = results.get("window_attention") or {}
    arows = attention.get("rows", [])
    naive = next((r for r in arows if r.get("backend") == "naive" and "error" not in r), None)
    sdpa = next((r for r in arows if r.get("backend") == "sdpa" and "error" not in r), None)
    if naive and sdpa:
        window = attention.get("setting", {}).get("window")
        add(f"sdpa window attention >= 5x faster than naive (window {window})",
            naive["median_ms"] / sdpa["median_ms"], 5.0, "naive latency / sdpa latency")
        add(f"sdpa window attention >= 10x less peak memory than naive (window {window})",
            naive["peak_mb"] / sdpa["peak_mb"] if sdpa["peak_mb"] > 0 else None, 10.0, "naive peak / sdpa peak")
    return targets


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def model_table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | attention | params (K) | latency (ms) | vs ESC | peak mem (MB) | vs ESC | first call (ms) | paper GPU lat (ms) | paper mem (MB) | Urban100 ×4 (paper) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        paper = row.get("paper") or {}
        backend = row.get("backend") or "—"
        if row.get("default_backend"):
            backend += " (default)"
        if "error" in row:
            lines.append(f"| {row['model']} | {backend} | — | failed: {row['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {backend} | {_fmt(row.get('params', 0) / 1e3)} | {_fmt(row.get('median_ms'))} | "
            f"{_ratio(row.get('latency_vs_esc'))} | {_fmt(row.get('peak_mb'), 0)} | {_ratio(row.get('memory_vs_esc'))} | "
            f"{_fmt(row.get('first_call_ms'), 0)} | {_fmt(paper.get('latency_ms'))} | {_fmt(paper.get('memory_mb'), 0)} | {_fmt(paper.get('urban100_psnr'), 2)} |"
        )
    return "\n".join(lines)


def render_markdown(results: dict[str, Any], plot_name: str | None = None) -> str:
    """The generated README section for one results file."""
    machine = results["machine"]
    threads = results.get("threads", {})
    where = machine.get("gpu") if machine.get("device") == "cuda" else machine.get("cpu")
    out = [
        f"### {results.get('machine_slug', '')} ({results.get('profile', '')} run)",
        "",
        f"- Machine: {where}, {machine.get('logical_cpus')} logical CPUs, {machine.get('memory_total_gib')} GiB RAM; "
        f"torch {machine.get('torch')}, python {machine.get('python')}; run started {machine.get('started_utc')}, "
        f"took {results.get('wall_s', 0) / 60:.1f} min.",
        f"- torch threads: {threads.get('used')} ({threads.get('reason', '')}).",
        f"- Load average (1/5/15 min) at start {machine.get('load_average_at_start')}, at end "
        f"{results.get('load_average_at_end')} (the end value includes this benchmark's own threads): "
        + ("**the machine was shared with other jobs; absolute times are inflated and noisy, the ratios "
           "(interleaved runs) are the meaningful part.**" if results.get("shared_load") else "the machine was idle."),
        "- Memory: " + ("CUDA `max_memory_allocated` over the timed runs." if machine.get("device") == "cuda" else
                        "peak RSS of a fresh process over the timed runs, minus its RSS after the imports "
                        "(weights + input + activations + caches + lazily loaded kernels), glibc mmap threshold "
                        "fixed so freed tensors leave the RSS."),
        "",
    ]
    targets = results.get("targets") or []
    if targets:
        out += ["**Targets** (ratios from this run):", "", "| target | value | threshold | met |", "|---|---:|---:|---|"]
        for t in targets:
            verdict = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
            out.append(f"| {t['target']} | {_fmt(t['value'], 2)} | {t['threshold']} | {verdict} |")
        out.append("")
    for table_name, title in (("model_table", "Models"), ("paper_protocol", "Paper protocol (1280×720 output)")):
        table = results.get(table_name)
        if not table or not table.get("rows"):
            continue
        for size in table.get("sizes", []):
            rows = [r for r in table["rows"] if r["size"] == size]
            if not rows:
                continue
            runs = next((r.get("runs") for r in rows if r.get("runs")), "?")
            out += [f"**{title}: ×4, input {size}, batch 1, fp32, median of {runs} interleaved runs after "
                    f"{table.get('warmup')} warm-up**", "", model_table_markdown(rows), ""]
    attention = results.get("window_attention")
    if attention and attention.get("rows"):
        s = attention["setting"]
        out += [f"**Window attention alone**: window {s['window']}, dim {s['dim']}, {s['heads']} heads, "
                f"{s['size'][0]}×{s['size'][1]} map, median of {s['runs']} runs (paper: flash vs naive "
                f"{attention['paper']['latency_ratio']}× faster, {attention['paper']['memory_ratio']}× less memory, GPU)",
                "", "| backend | kernel | latency (ms) | speed-up vs naive | peak mem (MB) | saving vs naive |",
                "|---|---|---:|---:|---:|---:|"]
        for r in attention["rows"]:
            if "error" in r:
                out.append(f"| {r['backend']} | failed: {r['error'][:80]} | | | | |")
                continue
            out.append(f"| {r['backend']} | {r.get('sdpa_kernel') or '—'} | {_fmt(r['median_ms'])} | "
                       f"{_ratio(r.get('speedup_vs_naive'))} | {_fmt(r['peak_mb'], 0)} | "
                       f"{_ratio(r.get('memory_saving_vs_naive'))} |")
        out.append("")
    scaling = results.get("scaling")
    if scaling and scaling.get("rows"):
        out += [f"**Scaling**: {scaling['preset']} ×{scaling['scale']} through `esc_sr.upscale`, fp32, "
                f"untiled and tiled (tile {scaling['tile']})", "",
                "| mode | LR input | pixels | latency (ms) | ms / kpixel | peak mem (MB) |", "|---|---|---:|---:|---:|---:|"]
        for r in scaling["rows"]:
            if "error" in r:
                out.append(f"| {r['mode']} | {r['side']}² | {r['pixels']} | failed: {r['error'][:60]} | | |")
                continue
            out.append(f"| {r['mode']} | {r['side']}×{r['side']} | {r['pixels']:,} | {_fmt(r['median_ms'])} | "
                       f"{_fmt(r['median_ms'] / (r['pixels'] / 1e3), 2)} | {_fmt(r['peak_mb'], 0)} |")
        for mode, fit in sorted(scaling.get("fits", {}).items()):
            lat, mem = fit.get("latency_ms"), fit.get("memory_mb")
            if lat and mem:
                out.append("")
                out.append(f"- {mode}: latency ≈ {lat['intercept']:.0f} ms + {lat['slope_per_pixel'] * 1e3:.2f} ms/kpixel "
                           f"(R² {lat['r2']:.3f}); memory ≈ {mem['intercept']:.0f} MB + "
                           f"{mem['slope_per_pixel'] * 1e6:.1f} MB/Mpixel (R² {mem['r2']:.3f})")
        out.append("")
    training = results.get("training")
    if training and training.get("rows"):
        out += [f"**Training throughput**: {training['preset']} ×4, one step of the recipe (forward, L1, backward, AdamW, EMA) on batch "
                f"{training['batch']} of {training.get('lr_patch', 64)}×{training.get('lr_patch', 64)} LR patches (the recipe uses {training['recipe_batch']} per GPU)", "",
                "| backend | kernel | s / iteration | LR patches / s | peak mem (MB) |", "|---|---|---:|---:|---:|"]
        for r in training["rows"]:
            if "error" in r:
                out.append(f"| {r['backend']} | failed: {r['error'][:80]} | | | |")
                continue
            out.append(f"| {r['backend']} | {r.get('sdpa_kernel') or '—'} | {_fmt(r['s_per_iter'], 2)} | "
                       f"{_fmt(r['lr_patches_per_s'], 2)} | {_fmt(r['peak_mb'], 0)} |")
        out.append("")
    flops = results.get("flops")
    if flops and "error" not in flops:
        out += [f"**The limit**: {flops['preset']} ×4 forward ({flops['backend']} attention) at {flops['size']} = {flops['forward_gflop']:.1f} GFLOP "
                f"({', '.join(f'{k} {v:.1f}' for k, v in flops['forward_gflop_by_op'].items())}); "
                f"median {flops['forward']['median_ms']:.0f} ms → **{flops['achieved_gflops']:.1f} GFLOP/s**, "
                f"against {flops['matmul_gflops']:.1f} GFLOP/s for a {flops['matmul_n']}² fp32 matmul in the same run "
                f"(**{100 * flops['fraction_of_matmul']:.0f}%**)."]
        prof = flops.get("profile")
        if prof:
            shares = ", ".join(f"{g} {100 * s:.0f}%" for g, s in prof["share_by_group"].items())
            out.append(f"Where the forward's time goes (profiler, self time): {shares}.")
        out.append("")
    if plot_name:
        out += [f"![latency vs Urban100 PSNR, bubble = memory](results/{plot_name})", ""]
    return "\n".join(out)


def update_readme(readme: Path, sections: list[str]) -> None:
    """Replace the generated block of ``readme`` (or append one) with ``sections``."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Benchmarks\n"
    block = README_BEGIN + "\n\n" + "\n".join(sections).rstrip() + "\n\n" + README_END
    if README_BEGIN in text and README_END in text:
        text = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(readme, text)


def load_results(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every full-run results file in ``folder`` (quick and smoke runs are not reported)."""
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("profile") == "full":
            found.append((path, data))
    return found


# ------------------------------------------------------------------------------------------------ plot
def plot_teaser(results: dict[str, Any], path: Path) -> Path | None:
    """Latency (log x) vs Urban100 ×4 PSNR from the paper's Table 2, bubble area = peak memory.

    Left: latency and memory measured in this run (the model table's first size, each model on its default
    path).  Right: the paper's own GPU numbers for the same models, for reference.  Models without a Table 2
    PSNR are left out of the plot (they are in the tables).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    table = results.get("paper_protocol") if results.get("machine", {}).get("device") == "cuda" else None
    table = table or results.get("model_table") or {}
    sizes = table.get("sizes") or []
    if not sizes:
        return None
    rows = [r for r in table.get("rows", []) if r["size"] == sizes[0] and "error" not in r and r.get("paper")
            and (r.get("family") == "peer" or r.get("default_backend")) and r.get("peak_mb") is not None]
    # (a tiny smoke-size case can measure 0 MB of peak growth: it is still a point of the plot)
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    panels = (
        (axes[0], [(r["model"], r["median_ms"], r["peak_mb"], r["paper"]["urban100_psnr"], r["family"]) for r in rows],
         f"measured here: {results.get('machine_slug', '')}, input {sizes[0]}"),
        (axes[1], [(r["model"], r["paper"]["latency_ms"], r["paper"]["memory_mb"], r["paper"]["urban100_psnr"],
                    r["family"]) for r in rows], "paper, Table 2 (GPU, 320×180 input)"),
    )
    for ax, points, title in panels:
        biggest = max(p[2] for p in points) or 1
        for name, latency, memory, psnr, family in points:
            colour = "tab:red" if family == "ours" else "tab:blue"
            ax.scatter(latency, psnr, s=60 + 2400 * memory / biggest, alpha=0.45, color=colour, edgecolors="k")
            ax.annotate(f"{name}\n{memory:.0f} MB", (latency, psnr), fontsize=8, ha="center", va="center")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("Urban100 ×4 PSNR (dB, paper Table 2)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        lo, hi = min(p[1] for p in points), max(p[1] for p in points)
        ax.set_xlim(lo / 1.8, hi * 1.8)
        ax.set_ylim(min(p[3] for p in points) - 0.15, max(p[3] for p in points) + 0.15)
    fig.suptitle("ESC-SR vs peers: latency vs PSNR, bubble area = peak memory (red: ESC family)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Regenerate the README's results section from the full results files, without measuring anything:
    ``python -m benchmarks report [--results DIR] [--readme PATH]``."""
    import argparse

    from .common import RESULTS_DIR

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent / "README.md")
    args = parser.parse_args(argv)
    found = load_results(args.results)
    if not found:
        print(f"no full results file in {args.results}; run python -m benchmarks run_all first")
        return 1
    update_readme(args.readme, [render_markdown(data, data.get("plot")) for _, data in found])
    print(f"updated {args.readme} from {len(found)} results file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
