"""Export ESC models to ONNX the way chaiNNer's own PyTorch->ONNX converter does, and check them.

The graph: input ``input`` (N, 3, H, W) RGB in [0, 1], output ``output`` (N, 3, H*s, W*s), the
clamp to [0, 1] inside the graph, dynamic batch/height/width, opset 17, fp32 or fp16.  One graph
serves every size: it is verified with onnxruntime against PyTorch at several odd sizes.

Two parts of ESC do not trace into a shape-generic ONNX graph as written, so during export only
(inside :func:`_export_friendly`) they are expressed differently, with identical results:

* the per-sample dynamic depthwise kernel is a grouped convolution with ``batch x channels``
  groups in PyTorch; an ONNX Conv's group count is a constant, so it is written as a sum of
  shifted, per-sample-weighted copies of the input (``k*k`` multiply-adds), which works for any
  batch;
* the geometric ensemble of the large kernel uses ``rot90``, which the exporter lacks; a symbolic
  (transpose + flip) is registered, and constant folding then bakes the ensembled kernel.

The window attention's reflect padding traces to shape-computed ``Pad`` amounts, so it stays
dynamic; inputs must be larger than half the window on each side (one reflection), which the
exported wrapper guarantees by replicate-padding smaller inputs (and cropping the output).

The DySample head traces as it is: its sampling grid is computed from the feature map's shape
(``arange`` of its sides), so it becomes ONNX ``Range`` / ``GridSample`` (opset 16+) on symbolic
sizes, and stays fp32 inside an fp16 graph, as in PyTorch.  The arbitrary-scale LTE model exports
at one fixed whole factor chosen at export time (``scale=``): the graph queries every output
pixel's centre and cell at once, which is what ``upscale_by(x, scale)`` computes in chunks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esc_sr.atomic import atomic_write
from esc_arch.errors import ESCError
from esc_arch.lte import make_coord

__all__ = [
    "OPSET",
    "CHECK_SIZES",
    "OnnxExportError",
    "ExportReport",
    "ClampedForExport",
    "export_onnx",
    "verify_onnx",
]

OPSET = 17  # >= 16 for GridSample (DySample, the LTE decoder); chaiNNer's converter offers 14-17
_LTE_FP16_ERROR = "0.35 in PyTorch"
CHECK_SIZES: tuple[tuple[int, int, int], ...] = ((1, 37, 53), (1, 61, 29), (2, 45, 47), (1, 97, 131))
"""(batch, height, width) the exported graph is checked at: odd, non-square, a batch of 2."""


class OnnxExportError(ESCError, ValueError):
    """The model cannot be exported or the exported graph disagrees with PyTorch (one line)."""


@dataclass
class ExportReport:
    path: Path
    half: bool
    scale: int
    max_abs_diff: dict[tuple[int, int, int], float] = field(default_factory=dict)


# -- export-time formulations ---------------------------------------------------------------------


def _per_sample_depthwise_conv_taps(x: torch.Tensor, kernels: torch.Tensor, padding: int) -> torch.Tensor:
    """Depthwise conv of each sample with its own (k x k) kernels, as k*k shifted multiply-adds.

    Same result as esc_arch.layers.per_sample_depthwise_conv (zero padding), but every shape in it
    stays symbolic, so the ONNX graph accepts any batch size.
    """
    h, w = x.shape[-2:]
    k = kernels.shape[-1]
    padded = F.pad(x, (padding, padding, padding, padding))
    out = None
    for i in range(k):
        for j in range(k):
            tap = padded[:, :, i : i + h, j : j + w] * kernels[:, :, i, j, None, None]
            out = tap if out is None else out + tap
    return out


def _rot90_symbolic(g, input, k, dims):
    """ONNX for ``torch.rot90`` (constant k and dims): a transpose and/or reversed slices."""
    from torch.onnx import symbolic_helper

    k = symbolic_helper._get_const(k, "i", "k") % 4
    a, b = symbolic_helper._get_const(dims, "is", "dims")
    rank = symbolic_helper._get_tensor_rank(input)
    a, b = a % rank, b % rank

    def flip(value, axis):
        const = lambda v: g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))  # noqa: E731
        return g.op("Slice", value, const(-1), const(-(2**63) + 1), const(axis), const(-1))

    def transpose(value):
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return g.op("Transpose", value, perm_i=perm)

    if k == 0:
        return input
    if k == 1:
        return flip(transpose(input), a)
    if k == 2:
        return flip(flip(input, a), b)
    return flip(transpose(input), b)


def _with_taps(cls: type) -> type:
    """``cls`` with its per-sample depthwise convolution as shifted multiply-adds (same result, any batch)."""
    return type(cls.__name__, (cls,), {"depthwise_conv": staticmethod(_per_sample_depthwise_conv_taps)})


@contextlib.contextmanager
def _export_friendly(model: nn.Module) -> Iterator[None]:
    """The export formulations (see the module docstring): ``model`` (the exporter's own copy) gets partial
    convolutions whose per-sample depthwise kernels are taps, and ``rot90`` a symbolic for the export's duration."""
    from esc_arch.blocks import ConvolutionalAttention, DecomposedConvolutionalAttention

    export_classes = {cls: _with_taps(cls) for cls in (ConvolutionalAttention, DecomposedConvolutionalAttention)}
    for module in model.modules():
        if type(module) in export_classes:
            module.__class__ = export_classes[type(module)]
    torch.onnx.register_custom_op_symbolic("aten::rot90", _rot90_symbolic, OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rot90", OPSET)


class ClampedForExport(nn.Module):
    """What the exported graph computes: the model, then the clamp to [0, 1] (as chaiNNer's own
    exporter, which wraps the spandrel descriptor).  Inputs with a side of at most half the window
    are first replicate-padded to ``min_size`` (the window attention reflects once) and the output
    is cropped back.

    An arbitrary-scale model (``model.arbitrary_scale``) needs ``scale``, the whole factor of the
    graph; it then renders what ``model.upscale_by(x, scale)`` renders.  Other models ignore
    ``scale`` unless it contradicts theirs.
    """

    def __init__(self, model: nn.Module, scale: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.arbitrary = bool(getattr(model, "arbitrary_scale", False))
        if self.arbitrary:
            if scale is None or int(scale) != scale or scale < 1:
                raise ValueError(f"an arbitrary-scale model exports at a whole factor >= 1, not {scale!r}")
            self.scale = int(scale)
            # The LTE cell rule (esc_arch.ESCLTE.query_cell) is 2 / output side, times a factor that only
            # depends on the scale; for an h x w input the cell is therefore this pair divided by (h, w).
            self.cell_times_size = tuple(float(c) for c in model.query_cell((1, 1), (self.scale, self.scale)))
        else:
            self.scale = int(model.scale)
        self.min_size = int(model.window_size) // 2 + 1
        unshuffle = int(getattr(model, "unshuffle", 1))
        self.min_size *= unshuffle  # the trunk of ESCRealM runs at 1/unshuffle resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Both pads are shape expressions, so they stay symbolic in the graph (0 for large inputs).
        pad_h = torch.clamp(self.min_size - torch.as_tensor(h), min=0)
        pad_w = torch.clamp(self.min_size - torch.as_tensor(w), min=0)
        x = F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")
        out = (self._render_fixed_scale(x) if self.arbitrary else self.model(x)).clamp(0, 1)
        return out[:, :, : h * self.scale, : w * self.scale]

    def _render_fixed_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The arbitrary-scale model at ``self.scale``: every output pixel queried at once, with the
        coordinates and cells ``upscale_by`` uses, all computed from the input's shape."""
        b = x.shape[0]
        h, w = x.shape[-2:]
        out_h, out_w = h * self.scale, w * self.scale
        coord = make_coord(out_h, out_w, device=x.device, dtype=x.dtype)
        cell = torch.stack([self.cell_times_size[0] / torch.as_tensor(h), self.cell_times_size[1] / torch.as_tensor(w)])
        cell = cell.to(device=x.device, dtype=x.dtype).expand_as(coord)
        rgb = self.model(x, coord.expand(b, -1, -1), cell.expand(b, -1, -1))
        return rgb.transpose(1, 2).reshape(b, 3, out_h, out_w)


# -- export and verification ----------------------------------------------------------------------


def _prepare(model: nn.Module, half: bool, scale: float | None) -> int:
    """Refuse what cannot be exported (each message says why); returns the graph's scale."""
    arch = getattr(model, "arch_name", type(model).__name__)
    if getattr(model, "arbitrary_scale", False):
        if scale is None:
            raise OnnxExportError(
                f"{arch} is an arbitrary-scale model; an ONNX graph has one fixed factor: choose it "
                "(esc-sr export-onnx --scale N, a whole number; e.g. --scale 3)"
            )
        if scale != int(scale) or scale < 1:
            # chaiNNer's ONNX loader takes the scale as output // input and only where it divides.
            raise OnnxExportError(
                f"--scale {scale:g}: an ONNX upscaler has a whole factor >= 1 (chaiNNer reads it as output "
                "size // input size); use `esc-sr upscale --outscale` for other factors"
            )
        if half and not getattr(model, "supports_half", True):
            raise OnnxExportError(
                f"{arch} is inaccurate in fp16 (its query coordinates and cell areas need fp32; measured max "
                f"|diff| vs fp32 {_LTE_FP16_ERROR}); export it without --half"
            )
        return int(scale)
    own = getattr(model, "scale", None)
    if own is None or own != int(own) or own < 1:
        # ESCRealM's 'conv' head after pixel-unshuffle never upsamples (upstream behaviour): x0.25 / x0.5.
        raise OnnxExportError(
            f"{arch} makes the image smaller (x{own:g}: this configuration's head does not upsample); "
            "chaiNNer reads an ONNX model's scale as output size // input size, which has no value for it"
        )
    if scale is not None and scale != own:
        raise OnnxExportError(f"{arch} is a fixed x{int(own)} model; --scale {scale:g} only applies to the arbitrary-scale model")
    if half and not getattr(model, "supports_half", True):
        raise OnnxExportError(f"{arch} is marked inaccurate in fp16 (supports_half is False); export it without --half")
    return int(own)


def _example_size(model: nn.Module) -> tuple[int, int]:
    """A traced example that needs window padding and (ESCRealM) unshuffle padding on both sides."""
    ws = int(model.window_size)
    f = int(getattr(model, "unshuffle", 1))
    return (ws + ws // 2 + 1) * f + 1, (ws + ws // 2 + 3) * f + 1


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    half: bool = False,
    scale: float | None = None,
    verify: bool = True,
    check_sizes: Sequence[tuple[int, int, int]] = CHECK_SIZES,
    tolerance: float | None = None,
) -> ExportReport:
    """Export an ESC model (an ``esc_arch`` module) to ``out`` (written atomically) and, with
    ``verify``, compare onnxruntime with PyTorch at ``check_sizes``.

    ``scale`` is the factor of the graph of an arbitrary-scale model (a whole number, required for
    it); for the others it may only repeat the model's own.  ``tolerance`` (max |difference| of the
    clamped outputs from the fp32 PyTorch model) defaults to 1e-3 for an fp32 graph and 5e-2 for an
    fp16 graph.  ``model`` itself is not modified.  Raises :class:`OnnxExportError`.
    """
    scale = _prepare(model, half, scale)
    out = Path(out)
    reference = ClampedForExport(copy.deepcopy(model), scale).float().eval()
    dtype = torch.float16 if half else torch.float32
    wrapper = ClampedForExport(copy.deepcopy(model), scale).to(dtype).eval()
    model = wrapper.model
    example = torch.rand(1, 3, *_example_size(model), dtype=dtype)
    with atomic_write(out) as tmp:
        with _export_friendly(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic are expected here
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["output"],
                opset_version=OPSET,
                dynamic_axes={
                    "input": {0: "batch_size", 2: "height", 3: "width"},
                    "output": {0: "batch_size", 2: "height", 3: "width"},
                },
                do_constant_folding=True,
                dynamo=False,
            )
        report = ExportReport(out, half, wrapper.scale)
        if verify:
            limit = tolerance if tolerance is not None else (5e-2 if half else 1e-3)
            report.max_abs_diff = verify_onnx(tmp, reference, check_sizes, tolerance=limit)
    report.path = out
    return report


def verify_onnx(
    onnx_path: str | os.PathLike[str],
    reference: nn.Module,
    sizes: Sequence[tuple[int, int, int]] = CHECK_SIZES,
    *,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> dict[tuple[int, int, int], float]:
    """Run the graph with onnxruntime (CPU) at each (batch, height, width) and compare it with
    ``reference`` (a :class:`ClampedForExport`); returns max |difference| per size."""
    import numpy as np

    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxExportError("verification needs onnxruntime (pip install onnxruntime), or pass --no-verify") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs log harmless constant-folding notices
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_type = session.get_inputs()[0].type
    generator = torch.Generator().manual_seed(seed)
    diffs: dict[tuple[int, int, int], float] = {}
    for batch, height, width in sizes:
        x = torch.rand(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = reference(x.to(next(reference.parameters()).dtype)).float().numpy()
        feed = x.numpy().astype(np.float16 if "float16" in input_type else np.float32)
        got = session.run(["output"], {"input": feed})[0].astype(np.float32)
        if got.shape != expected.shape:
            raise OnnxExportError(f"onnxruntime output shape {got.shape} != PyTorch {expected.shape} at {batch}x3x{height}x{width}")
        diff = float(np.abs(got - expected).max())
        diffs[(batch, height, width)] = diff
        if not diff <= tolerance:
            raise OnnxExportError(f"onnxruntime differs from PyTorch by {diff:.3g} (> {tolerance:g}) at {batch}x3x{height}x{width}")
    return diffs
