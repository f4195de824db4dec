"""The choices and defaults that the ``esc-sr`` command line and the ComfyUI nodes offer, stated once.

Both hosts must describe their options (``esc-sr --help``, ComfyUI's node list) without loading torch, so
these are plain values here, importing nothing. Where a value is owned by a module that does load torch (the
attention backends by :mod:`esc_arch.attention`, the overlap by :mod:`esc_sr.tiling`, ...), the comment names
it and tests/test_facts.py checks that the two agree. Hosts read this module; they restate nothing.
"""

from __future__ import annotations

__all__ = [
    "ATTENTION_BACKENDS", "PRECISIONS", "PRECISION_ALIASES", "DEFAULT_PRECISION", "ALPHA_MODES", "DEFAULT_ALPHA",
    "DEFAULT_TILE", "DEFAULT_OVERLAP", "DEFAULT_MAX_PARAMETERS", "ONNX_OPSET",
]

# Window-attention implementations, the model's default (sdpa) first. Owner: esc_arch.ATTENTION_BACKENDS.
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "flex", "naive")

# Compute precisions a user picks from; "auto" is decided per device and model by esc_sr.precision.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
# Other spellings the library (esc_sr.upscale, esc_sr.precision) accepts for them.
PRECISION_ALIASES: dict[str, str] = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
DEFAULT_PRECISION = "auto"

# How alpha is upscaled: through the model as a gray image, or with a Lanczos resize (esc_sr.upscale's alpha=).
ALPHA_MODES: tuple[str, ...] = ("model", "resize")
DEFAULT_ALPHA = "model"

# Tiles: "auto" sizes them from free memory (the nodes' tile_size 0 means the same). The overlap is the context
# around a crop-overlap tile, in input pixels. Owner: esc_sr.tiling.DEFAULT_OVERLAP.
DEFAULT_TILE = "auto"
DEFAULT_OVERLAP = 64

# The largest checkpoint accepted unless told (four times ESC-XL). Owner: esc_arch.checkpoint.DEFAULT_MAX_PARAMETERS.
DEFAULT_MAX_PARAMETERS = 50_000_000

# The ONNX opset of ``esc-sr export-onnx``. Owner: esc_sr.onnx_export.OPSET.
ONNX_OPSET = 17
