"""Every golden case produced by the official code (and neosr, traiNNer-redux) is reproduced.

Definition of correct: load the case's checkpoint with ``esc_arch.load_model`` (the variant and
every hyperparameter inferred from the tensors) and match the upstream output within 1e-4, in fp32,
on every case with the naive and sdpa backends and on three with flex, on ``--device``
(``pytest --device cuda``: on the GPU, TF32 off; see conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import esc_arch
import esc_sr
from golden import checkpoint_path, golden_cases, tensors

TOLERANCE = 1e-4
CASES = golden_cases()
BACKENDS = ("naive", "sdpa")  # on every case
FLEX_CASES = ("esc_x4", "esc_fp_x4", "escrealm_dysample_x4")  # flex: one compilation per attention shape
RUNS = [(case, backend) for case in CASES for backend in BACKENDS]
RUNS += [(case, "flex") for case in CASES if case["id"] in FLEX_CASES]

# The one case whose expected output needs a different scale than the checkpoint holds.
OVERRIDES = {"esc_x2_into_x4": {"upscaling_factor": 4}}
# Where the upstream class name differs from ours.
EXPECTED_ARCH = {
    "lte_esc": "ESCLTE",
    "neosr_esc_classic_x4": "ESC",
    "neosr_esc_real_nearestconv_x4": "ESCReal",
    "neosr_esc_real_dysample_x4": "ESCReal",
}


def _run(model, case, device):
    data = tensors(case)
    for run in case["runs"]:
        inputs = [data[name].to(device) for name in run["inputs"].values()]
        with torch.no_grad():
            yield run["output"], model(*inputs), data[run["output"]].to(device)


@pytest.mark.parametrize("case, backend", RUNS, ids=[f"{c['id']}-{b}" for c, b in RUNS])
def test_golden_case_matches_upstream(case, backend, device):
    model = esc_arch.load_model(checkpoint_path(case), attn_type=backend, **OVERRIDES.get(case["id"], {}))
    assert model.arch_name == EXPECTED_ARCH.get(case["id"], case["source"]["class"])
    assert esc_arch.count_parameters(model) == case["params"]
    for name, out, expected in _run(model.to(device), case, device):
        assert out.shape == expected.shape, name
        assert (out - expected).abs().max().item() <= TOLERANCE, name


def test_golden_fused_model_matches(device):
    case = next(c for c in CASES if c["id"] == "esc_x4")
    model = esc_arch.fuse(esc_arch.load_model(checkpoint_path(case)).to(device))
    for _ in range(2):  # the second pass reuses the baked tensors
        for name, out, expected in _run(model, case, device):
            assert (out - expected).abs().max().item() <= TOLERANCE, name


def test_x2_checkpoint_resized_into_x4_head_like_upstream():
    case = next(c for c in CASES if c["id"] == "esc_x2_into_x4")
    model = esc_arch.load_model(checkpoint_path(case), upscaling_factor=4)
    data = tensors(case)
    assert torch.equal(model.to_img.weight.detach(), data["aux.to_img_weight_x4"])
    assert torch.equal(model.to_img.bias.detach(), data["aux.to_img_bias_x4"])


def test_converted_checkpoint_loads_both_ways(device):
    """A checkpoint saved after upstream's convert() (ensemble baked in) loads like any other."""
    case = next(c for c in CASES if c["id"] == "esc_light_x4_converted")
    model = esc_arch.load_model(checkpoint_path(case)).to(device)
    for name, out, expected in _run(model, case, device):
        assert (out - expected).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_checkpoint_survives_safetensors_round_trip(case, tmp_path):
    """Every golden checkpoint converted by save_model loads back to the same model."""
    original = esc_arch.load_model(checkpoint_path(case), **OVERRIDES.get(case["id"], {}))
    path = esc_sr.save_model(original, tmp_path / f"{case['id']}.safetensors")
    reloaded = esc_arch.load_model(path)
    assert type(reloaded) is type(original)
    assert reloaded.hyperparameters == original.hyperparameters
    for (key, a), b in zip(original.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), key
