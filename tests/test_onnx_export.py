"""chaiNNer route (a): `esc-sr export-onnx` writes the graph chaiNNer's own converter would (input
`input`, output `output`, clamp inside, dynamic batch/height/width, opset 17), and one exported
graph matches PyTorch under onnxruntime at several odd sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import esc_arch
from esc_sr import cli
from esc_sr.onnx_export import CHECK_SIZES, ClampedForExport, OnnxExportError, export_onnx

from golden import GOLDEN_DIR

SMALL = dict(dim=16, pdim=8, n_blocks=1, conv_blocks=2, window_size=8, num_heads=2)
ODD_SIZES = CHECK_SIZES + ((1, 3, 5),)  # the last is below half the window: padded inside the graph


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights (upstream zero-initialises the dynamic-kernel projection)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if p.dim() > 1 else 0.05))
    return model.eval()


def _ort(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_graph_interface_is_what_chainner_expects(tmp_path) -> None:
    model = esc_arch.load_model(GOLDEN_DIR / "escrealm_pixelshuffle_x3.ckpt.pth")
    report = export_onnx(model, tmp_path / "3x.onnx")

    graph = onnx.load(str(report.path))
    onnx.checker.check_model(graph)
    assert [(op.domain, op.version) for op in graph.opset_import] == [("", 17)]
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert (inp.name, out.name) == ("input", "output")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch_size", 3, "height", "width"]
    assert any(node.op_type == "Clip" for node in graph.graph.node)  # clamp inside the graph
    assert report.scale == 3
    assert list(tmp_path.iterdir()) == [tmp_path / "3x.onnx"]  # no temporary file left behind


@pytest.mark.parametrize(
    "case",
    ["escrealm_nearestconv_x4", "trainner_escrealm_x2", "escrealm_nearestconv_x1_unshuffle"],
)
def test_one_fp32_graph_matches_pytorch_at_odd_sizes_and_batches(case, tmp_path) -> None:
    path = next(GOLDEN_DIR.glob(f"{case}.ckpt.*"))
    model = esc_arch.load_model(path)

    report = export_onnx(model, tmp_path / "m.onnx", check_sizes=ODD_SIZES)

    assert set(report.max_abs_diff) == set(ODD_SIZES)
    assert max(report.max_abs_diff.values()) <= 1e-3
    # Independently of export_onnx's own check: one session against the raw model (no wrapper), at
    # sizes above the graph's minimum (below it the graph replicate-pads; see the next tests).
    session = _ort(report.path)
    minimum = ClampedForExport(model).min_size
    for batch, h, w in ((1, minimum + 5, minimum + 1), (3, minimum, minimum + 8)):
        x = torch.rand(batch, 3, h, w)
        with torch.no_grad():
            expected = model(x).clamp(0, 1).numpy()
        got = session.run(["output"], {"input": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, 3, h * model.scale, w * model.scale)
        assert np.abs(got - expected).max() <= 1e-3


@pytest.mark.parametrize(
    "build",
    [
        lambda: esc_arch.esc(3, use_ln=True, **SMALL),
        lambda: esc_arch.esc_fp(2, **{**SMALL, "conv_blocks": 1}),
        lambda: esc_arch.esc_real(4, **SMALL),
        lambda: esc_arch.esc_real(2, upsampler="nearest+conv-neosr", **SMALL),
        lambda: esc_arch.esc_realm(4, upsampler="transpose+conv", mid_dim=8, **SMALL),
        lambda: esc_arch.esc_realm(2, upsampler="pixelshuffledirect", mid_dim=8, **SMALL),
    ],
    ids=["esc-x3-layernorm", "escfp-x2", "escreal-x4", "escreal-neosr-x2", "escrealm-transpose-x4", "escrealm-psd-x2"],
)
def test_every_exportable_variant_matches_pytorch(build, tmp_path) -> None:
    model = _randomised(build())
    report = export_onnx(model, tmp_path / "m.onnx", check_sizes=((1, 37, 53), (2, 29, 31), (1, 3, 5)))
    assert max(report.max_abs_diff.values()) <= 1e-3


def test_fp16_graph_takes_and_returns_fp16_and_stays_close_to_fp32(tmp_path) -> None:
    model = esc_arch.load_model(GOLDEN_DIR / "trainner_escrealm_x2.ckpt.safetensors")

    report = export_onnx(model, tmp_path / "half.onnx", half=True, check_sizes=ODD_SIZES)

    graph = onnx.load(str(report.path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert max(report.max_abs_diff.values()) <= 5e-3  # measured ~2e-3 against the fp32 model
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.parametrize(
    "file, reason",
    [
        ("lte_esc.ckpt.pth", "arbitrary-scale"),
        ("escrealm_dysample_x4.ckpt.pth", "DySample"),
        ("escrealm_conv_x1_unshuffle.ckpt.pth", "only integer scales"),
    ],
)
def test_models_that_cannot_export_are_refused_with_the_reason(file, reason, tmp_path) -> None:
    model = esc_arch.load_model(GOLDEN_DIR / file)
    with pytest.raises(OnnxExportError, match=reason):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_tiny_inputs_are_padded_inside_the_graph_like_the_wrapper_pads_them() -> None:
    model = _randomised(esc_arch.esc(2, **SMALL))
    wrapper = ClampedForExport(model)
    x = torch.rand(1, 3, 2, 3)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, wrapper.min_size - 3, 0, wrapper.min_size - 2), mode="replicate")
        expected = model(padded).clamp(0, 1)[:, :, :4, :6]
        assert torch.equal(wrapper(x), expected)
        big = torch.rand(1, 3, 9, 11)
        assert torch.equal(wrapper(big), model(big).clamp(0, 1))  # no padding once large enough


def test_cli_exports_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    checkpoint = GOLDEN_DIR / "escrealm_nearestconv_x3.ckpt.pth"
    out = tmp_path / "3x_escrealm.onnx"

    assert cli.main(["export-onnx", str(checkpoint), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: ESCRealM x3, fp32, opset 17" in printed
    assert "onnxruntime vs PyTorch at 2x3x45x47" in printed

    assert cli.main(["export-onnx", str(checkpoint), str(out)]) == 2
    assert "exists (use --overwrite to replace it)" in capsys.readouterr().err
    assert cli.main(["export-onnx", str(GOLDEN_DIR / "lte_esc.ckpt.pth"), str(tmp_path / "lte.onnx")]) == 1
    assert "arbitrary-scale" in capsys.readouterr().err
