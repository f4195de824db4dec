"""Which embedded model ``esc-sr upscale`` uses when ``-m`` is not given: one rule, read from a measured table.

:data:`MEASURED` is PSNR-Y / SSIM-Y (crop 4) of each embedded model on the 20 held-out photos, each degraded the
three ways of issue 25's table (``benchmarks/degradations.py``: *web* = bicubic /4 + JPEG q 35-70, *camera* = blur,
/4, noise, JPEG q 60-90, *clean* = bicubic /4), copied from :data:`MEASUREMENT`, which
``python -m benchmarks real_world --models default real --realesrgan --q40`` writes. ``tests/test_model_choice.py``
checks that the two agree, so the table cannot drift from the measurement; re-measure (a new ``real`` model) and
copy the numbers here, and the rule follows them.

The rule:

* an input is a *JPEG* when its bytes start with the JPEG start-of-image marker (``FF D8 FF``, whatever its name),
  else *lossless* (PNG, TIFF, WebP, BMP, ...);
* JPEG inputs are what the *web* and *camera* rows measured, lossless ones what *clean* measured
  (:data:`FORMAT_ROWS`);
* for each format, :data:`INCUMBENT` is used unless another embedded model beats it on every row of that format
  in both PSNR-Y and SSIM-Y (the two measures of issue 25's bars); then the best of those (mean PSNR-Y);
* ``esc-sr upscale`` loads one model for a batch: a batch whose files would get different models takes the one
  most of its files get (a tie: the incumbent).

This module imports nothing heavy (``esc-sr models`` prints the rule without torch).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["MEASURED", "MEASUREMENT", "FORMAT_ROWS", "INCUMBENT", "input_format", "model_for_format", "rule",
           "choose_embedded_model", "choose_for_batch"]

#: The results file the table below is copied from (relative to the repository root).
MEASUREMENT = "benchmarks/results/real_world.json"

#: The model used where no other is measured better (an :data:`esc_arch.EMBEDDED_MODELS` name).
INCUMBENT = "default"

#: Which measured rows stand for which input format.
FORMAT_ROWS: dict[str, tuple[str, ...]] = {"jpeg": ("web", "camera"), "lossless": ("clean",)}

#: embedded model -> row -> (PSNR-Y dB, SSIM-Y), from MEASUREMENT (rounded to 0.01 dB / 0.001).
MEASURED: dict[str, dict[str, tuple[float, float]]] = {
    # 2026-12-08, 2-core AMD EPYC; 'real' at 5,000 iterations. Bicubic: 26.64 / 0.687, 26.75 / 0.690, 28.03 / 0.751.
    "default": {"web": (26.67, 0.687), "camera": (27.08, 0.695), "clean": (29.94, 0.806)},
    "real": {"web": (27.01, 0.707), "camera": (27.20, 0.711), "clean": (28.21, 0.752)},
}

_JPEG_MAGIC = b"\xff\xd8\xff"


def input_format(path: str | Path) -> str:
    """``'jpeg'`` if the file's bytes are a JPEG's, else ``'lossless'`` (also for a file that cannot be read: the
    upscale reports that file's error itself)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_JPEG_MAGIC))
    except OSError:
        return "lossless"
    return "jpeg" if head == _JPEG_MAGIC else "lossless"


def model_for_format(fmt: str, measured: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> str:
    """The embedded model the rule picks for inputs of format ``fmt`` (a :data:`FORMAT_ROWS` key), from
    ``measured`` (default: :data:`MEASURED`)."""
    measured = MEASURED if measured is None else measured
    rows = FORMAT_ROWS[fmt]
    incumbent = measured[INCUMBENT]
    better = [name for name, scores in measured.items() if name != INCUMBENT and all(
        scores[row][0] > incumbent[row][0] and scores[row][1] > incumbent[row][1] for row in rows)]
    if not better:
        return INCUMBENT
    return max(better, key=lambda name: sum(measured[name][row][0] for row in rows))


def rule(measured: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> dict[str, str]:
    """Format -> the embedded model used for it."""
    return {fmt: model_for_format(fmt, measured) for fmt in FORMAT_ROWS}


def choose_embedded_model(path: str | Path) -> str:
    """The embedded model ``esc-sr upscale`` uses for this file when ``-m`` is not given."""
    return model_for_format(input_format(path))


def choose_for_batch(paths: Iterable[str | Path]) -> str:
    """The one embedded model for a batch: the choice of most of its files (a tie, or no files: the incumbent)."""
    votes = Counter(choose_embedded_model(path) for path in paths)
    if not votes:
        return INCUMBENT
    ranked = votes.most_common()
    top = [name for name, count in ranked if count == ranked[0][1]]
    return INCUMBENT if INCUMBENT in top or len(top) > 1 else top[0]
