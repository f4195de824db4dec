"""What the hosts offer and how a run's precision and alpha are decided, each stated once in esc_sr:

* :mod:`esc_sr.facts`: the choices and defaults of ``esc-sr`` and the ComfyUI nodes, importable without torch, equal
  to the values of the modules that own them;
* :mod:`esc_sr.precision`: a precision name to a dtype, and what ``'auto'`` is for a device and a model;
* :mod:`esc_sr.alpha`: alpha given apart from the image (a ComfyUI MASK) made to fit it.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()  # comfyui_nodes registers ESC with spandrel, which imports torchvision

import esc_arch  # noqa: E402
from esc_sr import alpha, engine, facts, precision  # noqa: E402

CPU, CUDA, MPS, XPU = (torch.device(kind) for kind in ("cpu", "cuda", "mps", "xpu"))


def _subcommand_options(name: str) -> dict:
    import argparse

    from esc_sr import cli

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {action.dest: action for action in commands[name]._actions}


# ------------------------------------------------------------------------------------------- facts


def test_the_facts_load_no_torch():
    """``esc-sr --help`` and ComfyUI's node list read them before anything needs torch."""
    code = "import sys, esc_sr.facts; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_the_facts_agree_with_the_modules_that_own_them():
    from esc_arch import checkpoint
    from esc_sr import onnx_export, tiling

    assert facts.ATTENTION_BACKENDS == tuple(esc_arch.ATTENTION_BACKENDS)
    assert facts.DEFAULT_OVERLAP == tiling.DEFAULT_OVERLAP == engine.DEFAULT_OVERLAP
    assert facts.DEFAULT_MAX_PARAMETERS == checkpoint.DEFAULT_MAX_PARAMETERS
    assert facts.ONNX_OPSET == onnx_export.OPSET
    assert set(facts.PRECISION_ALIASES.values()) <= set(facts.PRECISIONS)
    assert facts.DEFAULT_PRECISION in facts.PRECISIONS and facts.DEFAULT_ALPHA in facts.ALPHA_MODES


def test_the_cli_and_comfyui_offer_the_backends_the_model_has():
    from comfyui_nodes import nodes

    model = esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1)
    for backend in esc_arch.ATTENTION_BACKENDS:
        esc_arch.set_attention_backend(model, backend)  # each one a model can run
    for command in ("upscale", "info"):
        assert tuple(_subcommand_options(command)["attention"].choices) == tuple(esc_arch.ATTENTION_BACKENDS)
    assert nodes.ATTENTION_BACKENDS == ["auto", *esc_arch.ATTENTION_BACKENDS]  # auto: the model's own


def test_the_cli_and_comfyui_offer_the_same_precisions_alpha_modes_and_overlap():
    from comfyui_nodes import nodes

    upscale = _subcommand_options("upscale")
    assert tuple(upscale["precision"].choices) == tuple(nodes.PRECISIONS) == facts.PRECISIONS
    assert upscale["precision"].default == nodes.UpscaleImageESC.INPUT_TYPES()["required"]["precision"][1]["default"]
    assert tuple(upscale["alpha"].choices) == tuple(nodes.ALPHA_MODES) == facts.ALPHA_MODES
    assert upscale["alpha"].default == nodes.UpscaleImageESC.INPUT_TYPES()["required"]["alpha_upscale"][1]["default"]
    assert upscale["overlap"].default == nodes.UpscaleImageESC.INPUT_TYPES()["required"]["overlap"][1]["default"]
    assert upscale["overlap"].default == engine.DEFAULT_OVERLAP


# --------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("name, dtype", [
    ("fp32", torch.float32), ("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16),
    ("half", torch.float16), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("auto", torch.float32),
])
def test_every_spelling_of_a_precision_names_its_dtype(name, dtype):
    assert precision.resolve_precision(name, CPU) == dtype
    assert engine.resolve_precision(name, CPU) == dtype  # the engine's name for it, kept for its callers


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(engine.EngineError, match="unknown precision 'fp8'; use auto, fp32, fp16 or bf16"):
        precision.resolve_precision("fp8", CPU)


def test_bf16_is_refused_where_the_device_has_none():
    with pytest.raises(engine.EngineError, match="not supported on MPS"):
        precision.resolve_precision("bf16", MPS)


def test_auto_is_fp32_on_the_cpu_and_fp16_on_cuda_and_mps():
    assert precision.choose("auto", CPU) == "fp32"
    assert precision.choose("auto", CUDA) == precision.choose("auto", MPS) == "fp16"
    assert precision.choose("auto", XPU) == "fp32"  # an accelerator nothing is known about
    assert engine.resolve_precision("auto", CUDA) == torch.float16


def test_auto_takes_the_hosts_advice_on_an_accelerator_but_not_on_the_cpu():
    """ComfyUI says which half precision a GPU runs well (and honours --force-fp32)."""
    assert precision.choose("auto", CUDA, runs=lambda dtype: dtype == torch.bfloat16) == "bf16"
    assert precision.choose("auto", CUDA, runs=lambda dtype: False) == "fp32"
    assert precision.choose("auto", XPU, runs=lambda dtype: True) == "fp16"
    assert precision.choose("auto", CPU, runs=lambda dtype: True) == "fp32"


def test_auto_keeps_a_model_without_half_precision_in_fp32_and_a_choice_is_kept():
    """ESC-LTE declares supports_half = False: its query coordinates need more than fp16's mantissa."""
    lte = esc_arch.esc_lte(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2, hidden_dim=32,
                           mlp_hidden=(32, 32))
    assert lte.supports_half is False
    assert precision.choose("auto", CUDA, lte) == "fp32"
    assert precision.choose("auto", CUDA, esc_arch.esc_tiny()) == "fp16"
    assert precision.choose("fp16", CUDA, lte) == "fp16"  # the user's explicit choice
    assert precision.choose("half", CPU) == "fp16"  # in its canonical spelling
    assert precision.for_model("auto", lte) == "fp32" and precision.for_model("auto", types.SimpleNamespace()) == "auto"


# ------------------------------------------------------------------------------------------- alpha


def test_a_separate_alpha_is_fitted_to_the_image():
    rgb = torch.rand(3, 3, 8, 12)
    small = torch.ones(1, 1, 4, 6, dtype=torch.float64)
    fitted = alpha.fit_alpha(small, rgb)
    assert fitted.shape == (3, 1, 8, 12) and fitted.dtype == rgb.dtype  # resized, one plane for the whole batch
    assert alpha.fit_alpha(torch.rand(5, 1, 8, 12), rgb).shape == (3, 1, 8, 12)  # extra planes dropped
    assert float(alpha.fit_alpha(torch.full((1, 1, 2, 2), 1.0), rgb).max()) <= 1.0


def test_alpha_joins_the_image_as_a_fourth_plane_and_splits_off_again():
    rgb, coverage = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    planes = alpha.join_alpha(rgb, coverage)
    assert planes.shape == (2, 4, 8, 8)
    color, back = alpha.split_alpha(planes)
    assert torch.equal(color, rgb) and torch.equal(back, coverage)
    assert alpha.join_alpha(rgb, None) is rgb and alpha.split_alpha(rgb)[1] is None
