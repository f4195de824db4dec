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


# ------------------------------------------------------------------------------ forward-mode AD (issue 26)


def _dual_model(backend: str) -> esc_arch.ESCModelBase:
    """A small ESC whose every layer kind has a fast path on a CPU (16-channel heads, dynamic kernels switched on)."""
    torch.manual_seed(0)
    model = esc_arch.esc_tiny(4, dim=32, pdim=16, n_blocks=1, conv_blocks=1, num_heads=2).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential) and isinstance(module[0], torch.nn.AdaptiveAvgPool2d):
            torch.nn.init.normal_(module[-1].weight)
    esc_arch.set_attention_backend(model, backend)
    return model


def _jvp_under_no_grad(model, x: torch.Tensor, tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    from torch.autograd import forward_ad

    with torch.no_grad(), forward_ad.dual_level():  # no_grad does not switch dual tensors off
        out = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent)))
        return out.primal, out.tangent


def test_forward_mode_ad_through_a_prepared_model_matches_the_plain_model():
    """Issue 26: the native and oneDNN paths computed on plain storage and dropped the tangent (|error| up to 1.02 of
    a 2.15 tangent). A prepared model under forward-mode AD or torch.func runs the plain model, whose operators carry
    the tangent; the 'naive' backend's are all differentiable forward."""
    model = _dual_model("naive")
    prepared = esc_runtime.prepare(model, "cpu", torch.float32)
    fast = [c.implementation.name for c in prepared.plan.choices.values()]
    x, tangent = torch.rand(1, 3, 150, 140), torch.rand(1, 3, 150, 140)  # large enough for the FFT path
    primal, expected = _jvp_under_no_grad(model, x, tangent)
    assert expected is not None and float(expected.abs().max()) > 0.1
    got_primal, got = _jvp_under_no_grad(prepared, x, tangent)
    assert got is not None, f"the tangent was dropped ({fast})"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_primal, primal, atol=1e-5, rtol=0)
    _, func_tangent = torch.func.jvp(prepared, (x,), (tangent,))
    torch.testing.assert_close(func_tangent, expected, atol=1e-5, rtol=0)
    # The same model, prepared, without AD: the fast paths it chose still run.
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), primal, atol=1e-4, rtol=0)


def test_forward_mode_ad_raises_as_the_plain_model_does_where_torch_cannot_carry_it():
    """The 'sdpa' backend's CPU kernel has no forward-mode derivative: torch raises, for the prepared model too, rather
    than a prepared model returning an output without its tangent."""
    model = _dual_model("sdpa")
    prepared = esc_runtime.prepare(model, "cpu", torch.float32)
    x = torch.rand(1, 3, 64, 64)
    for candidate in (model, prepared):
        with pytest.raises(NotImplementedError, match="forward AD"):
            _jvp_under_no_grad(candidate, x, torch.rand_like(x))


def test_every_fast_path_refuses_dual_tensors_per_call():
    """The per-call gates of the fast paths (native kernels, oneDNN, FFT) say no inside a dual level or a torch.func
    transform, whatever chose them when the model was prepared."""
    from torch.autograd import forward_ad

    from esc_runtime import native, onednn, spectral

    x, kernel = torch.rand(1, 16, 160, 160), torch.rand(16, 16, 13, 13)
    gates = {"onednn": lambda t: onednn.applies(t), "fft": lambda t: spectral.applies(t, kernel),
             "native": lambda t: native._inference(t)}
    with torch.no_grad():
        outside = {name: gate(x) for name, gate in gates.items()}
        assert outside["fft"] == spectral.enabled() and outside["native"] == native.available()
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.ones_like(x))
            assert {name: gate(dual) for name, gate in gates.items()} == dict.fromkeys(gates, False)
        inside_jvp = {}
        torch.func.jvp(lambda t: inside_jvp.update({n: g(t) for n, g in gates.items()}) or t, (x,), (x,))
        assert inside_jvp == dict.fromkeys(gates, False)
