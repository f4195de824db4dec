"""The inference runtime (esc_runtime): a plain model prepared once for a device and dtype computes what the plain
model computes, on every golden case, whichever implementations it chose, and says why it chose them."""

from __future__ import annotations

import pytest
import torch

import esc_arch
import esc_runtime
from esc_runtime.layers import KINDS, Target
from golden import checkpoint_path, golden_cases, tensors

TOLERANCE = 1e-4
CASES = golden_cases()
OVERRIDES = {"esc_x2_into_x4": {"upscaling_factor": 4}}
#: From the fastest plan this machine allows down to the plain modules everywhere.
PLANS = {
    "fastest": (),
    "no-native": ("native",),
    "no-native-no-fft": ("native", "fft"),
    "modules-only": ("native", "fft", "onednn", "sdpa-cpu-layout"),
}


def _load(case: dict, **overrides) -> esc_arch.ESCModelBase:
    return esc_arch.load_model(checkpoint_path(case), **OVERRIDES.get(case["id"], {}), **overrides)


def _outputs(model, case) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, output, expected) of every run of the case."""
    data = tensors(case)
    with torch.no_grad():
        return [(run["output"], model(*[data[name] for name in run["inputs"].values()]), data[run["output"]])
                for run in case["runs"]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_the_prepared_model_reproduces_every_golden_case(case, fused):
    model = _load(case).eval()
    prepared = esc_runtime.prepare(esc_arch.fuse(model) if fused else model)
    for name, out, expected in _outputs(prepared, case):
        assert out.shape == expected.shape, name
        assert (out - expected).abs().max().item() <= TOLERANCE, name


@pytest.mark.parametrize("disable", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("case_id", ["esc_x4", "esc_fp_x4", "escrealm_dysample_x4", "lte_esc", "esc_light_x3"])
def test_every_plan_equals_the_plain_model(case_id, disable):
    case = next(c for c in CASES if c["id"] == case_id)
    model = esc_arch.fuse(_load(case))
    prepared = esc_runtime.prepare(model, disable=disable)
    for (name, out, _), (_, plain, _) in zip(_outputs(prepared, case), _outputs(model, case)):
        assert (out - plain).abs().max().item() <= TOLERANCE, name


def test_every_kind_ends_with_the_plain_module_which_runs_anywhere():
    for kind, implementations in KINDS.items():
        assert implementations[-1].name == "module", kind
    prepared = esc_runtime.prepare(esc_arch.esc_tiny(4).eval(), disable=[i.name for k in KINDS.values() for i in k])
    assert all(line.split(": ", 1)[1].startswith("module") for line in prepared.report())


def test_each_choice_says_why_the_faster_ones_were_passed_over():
    model = esc_arch.esc_tiny(4).eval()
    half = esc_runtime.prepare(model, "cpu", torch.bfloat16)
    attention = half.plan.choices["window attention"]
    assert attention.implementation.name == "sdpa-cpu-layout"
    assert ("native", "float32 CPU inference only (this is torch.bfloat16 on cpu)") in attention.rejected
    assert half.plan.choices["ConvFFN"].implementation.name == "module"

    naive = esc_runtime.prepare(esc_arch.esc_tiny(4, attn_type="naive").eval())
    assert naive.plan.choices["window attention"].implementation.name == "module"
    assert "the model asks for the 'naive' backend" in naive.report()[0]


def test_the_choices_for_a_gpu_are_the_plain_modules():
    layer = esc_arch.esc_tiny(4).blocks[0].attn
    choice = esc_runtime.choose("window attention", layer, Target(torch.device("cuda"), torch.float16))
    assert choice.implementation.name == "module"
    assert [name for name, _ in choice.rejected] == ["native", "sdpa-cpu-layout"]


def test_a_model_already_in_place_is_used_as_it_is_and_left_unchanged():
    model = esc_arch.esc_tiny(4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = esc_runtime.prepare(model)
    assert prepared.model is model and not model.is_fused  # nothing copied, nothing baked
    prepared(torch.rand(1, 3, 20, 20))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert esc_runtime.prepare(prepared) is prepared


def test_a_model_elsewhere_is_copied_there_and_fused():
    model = esc_arch.esc_tiny(4).eval()
    prepared = esc_runtime.prepare(model, "cpu", torch.bfloat16)
    assert prepared.model is not model and prepared.model.is_fused
    assert next(model.parameters()).dtype == torch.float32
    assert prepared(torch.rand(1, 3, 16, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_prepared_model_is_for_inference_only():
    prepared = esc_runtime.prepare(esc_arch.esc_tiny(4).eval())
    with pytest.raises(RuntimeError, match="for inference"):
        prepared.train()
    assert not prepared(torch.rand(1, 3, 16, 16)).requires_grad
    assert prepared.scale == 4 and prepared.window_size == 16  # the plain model's attributes


def test_the_attention_report_names_what_runs():
    model = esc_arch.esc_tiny(4).eval()
    prepared = esc_runtime.prepare(model)
    expected = "native" if prepared.plan.attention.name == "native" else "flash (CPU)"
    assert esc_runtime.attention_kernel(model, "cpu").startswith(expected)
    assert esc_runtime.attention_kernel(model, "cpu", training=True).startswith("math")
    assert esc_runtime.attention_kernel(esc_arch.esc_tiny(4, attn_type="naive")).startswith("naive")
