"""chaiNNer route (a): `esc-sr export-onnx` writes the graph chaiNNer's own converter would (input
`input`, output `output`, clamp inside, dynamic batch/height/width, opset 17), and one exported
graph matches PyTorch under onnxruntime at several odd sizes: every head, DySample included, and
the arbitrary-scale LTE model at a fixed factor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import esc_arch
import esc_sr
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


def _graph_ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_dysample_golden_graph_matches_pytorch_at_odd_sizes_in_fp32_and_fp16(tmp_path) -> None:
    model = esc_arch.load_model(GOLDEN_DIR / "escrealm_dysample_x4.ckpt.pth")  # official ESCRealM 'dysample'

    fp32 = export_onnx(model, tmp_path / "fp32.onnx", check_sizes=ODD_SIZES)
    fp16 = export_onnx(model, tmp_path / "fp16.onnx", half=True, check_sizes=ODD_SIZES)

    assert "GridSample" in _graph_ops(fp32.path)
    assert max(fp32.max_abs_diff.values()) <= 1e-4  # measured 8e-7 - 2.6e-6
    assert max(fp16.max_abs_diff.values()) <= 2e-3  # measured 3.3e-4 - 3.8e-4 against the fp32 model
    # One session, sizes the export check did not use, against the raw model.
    session = _ort(fp32.path)
    for batch, h, w in ((1, 23, 41), (3, 19, 17)):
        x = torch.rand(batch, 3, h, w)
        with torch.no_grad():
            expected = model(x).clamp(0, 1).numpy()
        got = session.run(["output"], {"input": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, 3, 4 * h, 4 * w)
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "build",
    [
        lambda: esc_arch.esc_real(4, upsampler="dysample", **SMALL),   # official ESC-Real use_dysample / neosr esc
        lambda: esc_arch.esc_real(2, use_dysample=True, **SMALL),
        lambda: esc_arch.esc_realm(2, upsampler="dysample", mid_dim=8, **SMALL),  # x2: pixel-unshuffle + x4 head
    ],
    ids=["escreal-dysample-x4", "escreal-dysample-x2", "escrealm-dysample-x2-unshuffle"],
)
def test_dysample_heads_export_with_dynamic_batch_height_and_width(build, tmp_path) -> None:
    model = _randomised(build())
    report = export_onnx(model, tmp_path / "m.onnx", check_sizes=((1, 37, 53), (2, 29, 31), (1, 61, 19), (1, 3, 5)))
    assert max(report.max_abs_diff.values()) <= 1e-4
    graph = onnx.load(str(report.path))
    dims = [d.dim_param or d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", 3, "height", "width"]


def _small_lte() -> torch.nn.Module:
    model = _randomised(esc_arch.esc_lte(**{k: v for k, v in SMALL.items()}, hidden_dim=16, mlp_hidden=(16, 16)))
    with torch.no_grad():  # keep the decoder's output inside [0, 1] mostly, so the clamp hides nothing
        model.imnet.layers[-1].weight.mul_(0.1)
    return model


@pytest.mark.parametrize("factor", [3, 5])  # 5: beyond the trained x4, the cell rule enlarges the cells
def test_arbitrary_scale_model_exports_at_a_fixed_factor_and_matches_upscale_by(factor, tmp_path) -> None:
    model = _small_lte()

    report = export_onnx(model, tmp_path / "lte.onnx", scale=factor, check_sizes=ODD_SIZES)

    assert report.scale == factor
    assert max(report.max_abs_diff.values()) <= 1e-4
    session = _ort(report.path)
    for batch, h, w in ((1, 21, 13), (2, 17, 30)):  # above the window minimum: exactly upscale_by
        x = torch.rand(batch, 3, h, w)
        with torch.no_grad():
            expected = model.upscale_by(x, factor).clamp(0, 1).numpy()
        got = session.run(["output"], {"input": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, 3, factor * h, factor * w)
        assert 0.01 < expected.mean() < 0.99
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "file, options, reason",
    [
        ("lte_esc.ckpt.pth", {}, r"arbitrary-scale model; an ONNX graph has one fixed factor: choose it \(esc-sr export-onnx --scale N"),
        ("lte_esc.ckpt.pth", {"scale": 2.5}, r"--scale 2.5: an ONNX upscaler has a whole factor >= 1 \(chaiNNer reads it as output size // input size\)"),
        ("lte_esc.ckpt.pth", {"scale": 3, "half": True}, r"ESCLTE is inaccurate in fp16 .*0\.35.*without --half"),
        ("escrealm_conv_x1_unshuffle.ckpt.pth", {}, r"makes the image smaller \(x0.25.*output size // input size"),
        ("escrealm_nearestconv_x3.ckpt.pth", {"scale": 2}, r"fixed x3 model; --scale 2 only applies to the arbitrary-scale model"),
    ],
    ids=["lte-without-scale", "lte-fractional-scale", "lte-fp16", "escrealm-x0.25", "fixed-model-other-scale"],
)
def test_what_cannot_export_is_refused_with_a_reason_that_holds(file, options, reason, tmp_path) -> None:
    model = esc_arch.load_model(GOLDEN_DIR / file)
    with pytest.raises(OnnxExportError, match=reason):
        export_onnx(model, tmp_path / "m.onnx", **options)
    assert not list(tmp_path.iterdir())


def test_the_refusal_reasons_are_true() -> None:
    """What the messages above claim, checked: the x0.25 model really shrinks the image, chaiNNer's
    integer scale rule (output // input where it divides) has no value for it, and the LTE decoder
    really is inaccurate in fp16 (supports_half is False because of a measured error)."""
    shrinking = esc_arch.load_model(GOLDEN_DIR / "escrealm_conv_x1_unshuffle.ckpt.pth")
    with torch.no_grad():
        out = shrinking(torch.rand(1, 3, 64, 64))
    assert out.shape[-2:] == (16, 16) and 16 % 64 != 0
    lte = esc_arch.load_model(GOLDEN_DIR / "lte_esc.ckpt.pth")
    assert lte.arbitrary_scale and not lte.supports_half
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        fp32 = lte.upscale_by(x, 2).clamp(0, 1)
        fp16 = lte.half().upscale_by(x.half(), 2).float().clamp(0, 1)
    assert not (fp16 - fp32).abs().max() <= 0.05  # NaN or a large error


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
    assert "--scale N" in capsys.readouterr().err


def test_cli_exports_the_arbitrary_scale_model_at_the_given_scale(tmp_path, capsys) -> None:
    checkpoint = esc_sr.save_model(_small_lte(), tmp_path / "lte.safetensors")
    out = tmp_path / "3x_lte.onnx"

    assert cli.main(["export-onnx", str(checkpoint), str(out), "--scale", "3"]) == 0

    assert f"wrote {out}: ESCLTE x3, fp32, opset 17" in capsys.readouterr().out
    session = _ort(out)
    assert session.run(["output"], {"input": np.random.rand(1, 3, 19, 22).astype(np.float32)})[0].shape == (1, 3, 57, 66)
