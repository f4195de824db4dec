"""Behaviour of the model definitions: presets, attention backends, any input size, fuse, training."""

from __future__ import annotations

import pytest
import torch

import esc_arch
import esc_runtime
from esc_arch.attention import relative_position_index


def small_esc(**kw):
    return esc_arch.ESC(**{"dim": 32, "pdim": 8, "n_blocks": 1, "conv_blocks": 2, "window_size": 8, "num_heads": 2,
                           "upscaling_factor": 2, **kw})


@pytest.mark.parametrize(
    "preset, scale, params",
    [("esc", 4, 967_500), ("esc", 2, 946_728), ("esc", 3, 955_383), ("esc_light", 4, 624_372),
     ("esc_fp", 4, 539_263), ("esc_xl", 4, 12_518_160), ("esc_lte", None, 1_433_631)],
)
def test_preset_parameter_counts_equal_the_paper(preset, scale, params):
    model = esc_arch.PRESETS[preset](scale) if scale else esc_arch.PRESETS[preset]()
    assert esc_arch.count_parameters(model) == params


def test_relative_position_index_is_key_minus_query_and_shared():
    ws = 4
    index = relative_position_index(ws)
    q, k = 1 * ws + 2, 3 * ws + 0  # query (1, 2), key (3, 0)
    assert index[q, k] == (3 - 1 + ws - 1) * (2 * ws - 1) + (0 - 2 + ws - 1)
    assert relative_position_index(ws).data_ptr() == index.data_ptr()  # built once, reused


def _randomize(model, std=0.05):
    torch.manual_seed(0)
    for p in model.parameters():  # random everything (zero-initialised parts included), outputs O(1)
        p.data.normal_(0, std)
    return model


@pytest.mark.parametrize("factory", [
    lambda: small_esc(),
    lambda: esc_arch.ESCFP(dim=24, pdim=8, n_blocks=1, conv_blocks=2, window_size=8, num_heads=3, upscaling_factor=2),
    lambda: esc_arch.ESCRealM(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2, upscaling_factor=2,
                              mid_dim=16, upsampler="dysample"),
])
def test_sdpa_and_naive_backends_agree(factory):
    model = _randomize(factory().eval())
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        naive = esc_arch.set_attention_backend(model, "naive")(x)
        sdpa = esc_arch.set_attention_backend(model, "sdpa")(x)
    assert (sdpa - naive).abs().max() <= 1e-5


def test_flex_backend_agrees_with_naive():
    attention = esc_arch.WindowAttention(32, 8, 2, "naive").eval()
    _randomize(attention, std=0.3)
    x = torch.randn(2, 32, 19, 23)
    with torch.no_grad():
        naive = attention(x)
        attention.attn_type = "flex"
        flex = attention(x)
    assert (flex - naive).abs().max() <= 1e-5


def _failing_compile(error: Exception):
    def compiled(*args, **kwargs):
        raise error

    return lambda: compiled


def test_flex_compile_failure_falls_back_eagerly_and_says_so(monkeypatch):
    from esc_arch import attention as attention_module

    monkeypatch.setattr(attention_module, "_compiled_flex_attention", _failing_compile(RuntimeError("inductor bug")))
    failed = set()
    for module in (attention_module, esc_runtime.report):  # the report holds its own references to both
        monkeypatch.setattr(module, "_FLEX_COMPILE_FAILED", failed)
        monkeypatch.setattr(module, "flex_compiler_available", lambda: True)
    layer = esc_arch.WindowAttention(32, 8, 2, "flex").eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="flex_attention failed .*inductor bug.*runs flex_attention eagerly"):
        out = layer(x)
    layer.attn_type = "naive"
    with torch.no_grad():
        assert (out - layer(x)).abs().max() <= 1e-5
    assert "eager for 1 shape" in esc_runtime.attention_kernel(esc_arch.set_attention_backend(small_esc(), "flex"))


def test_flex_out_of_memory_stays_out_of_memory(monkeypatch):
    from esc_arch import attention as attention_module

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(attention_module, "_compiled_flex_attention", _failing_compile(oom))
    monkeypatch.setattr(attention_module, "_FLEX_COMPILE_FAILED", set())
    monkeypatch.setattr(attention_module, "flex_compiler_available", lambda: True)
    layer = esc_arch.WindowAttention(32, 8, 2, "flex").eval()
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError):
        layer(torch.randn(1, 32, 8, 8))
    assert attention_module._FLEX_COMPILE_FAILED == set()  # nothing blacklisted: the next tile may fit


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 2), (4, 4), (5, 9), (8, 8), (17, 3)])
def test_any_input_size_works(size):
    model = small_esc().eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * 2, size[1] * 2)
    assert torch.isfinite(out).all()


def test_batch_equals_per_sample():
    model = _randomize(small_esc().eval())
    x = torch.rand(3, 3, 12, 10)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert (batched - single).abs().max() <= 1e-5


def test_fuse_bakes_constants_once_and_keeps_outputs():
    model = _randomize(small_esc())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = model.eval()(x)
    esc_arch.fuse(model)
    calls = []
    original = esc_arch.layers.geometric_ensemble
    esc_arch.base.geometric_ensemble = lambda k: calls.append(1) or original(k)
    try:
        with torch.no_grad():
            after = model(x)
            model(x)
    finally:
        esc_arch.base.geometric_ensemble = original
    assert calls == []  # nothing recomputed after fuse()
    assert (before - after).abs().max() <= 1e-6
    assert model.is_fused and set(model.state_dict()) == set(small_esc().state_dict())  # nothing baked is saved


def test_a_fused_model_refuses_training_and_new_weights():
    model = esc_arch.fuse(small_esc())
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.train()
    with pytest.raises(RuntimeError, match="load its weights before esc_arch.fuse"):
        model.load_state_dict(small_esc().state_dict())


def test_an_unfused_model_sees_weights_changed_in_place():
    """No caches: BasicSR's EMA writes through .data, and validation must see it without any hook."""
    model = _randomize(small_esc()).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        model.plk_filter.data.mul_(2)
        model.blocks[0].attn.relative_position_bias.data.add_(1)
        after = model(x)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_training_backward(backend, device):
    model = small_esc(attn_type=backend).train().to(device)
    x = torch.rand(2, 3, 16, 16, device=device)
    model(x).abs().mean().backward()
    bias_grad = model.blocks[0].attn.relative_position_bias.grad
    assert bias_grad is not None and bias_grad.abs().sum() > 0
    assert model.plk_filter.grad is not None


def test_flex_refuses_training_on_cpu_with_a_clear_error():
    model = small_esc(attn_type="flex").train()
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        model(torch.rand(1, 3, 8, 8)).sum().backward()


def test_attention_kernel_reports_what_torch_dispatches():
    model = small_esc()
    assert "flash" in esc_runtime.attention_kernel(model, "cpu")
    # the learnable bias requires grad in training: torch silently uses the math kernel on CPU
    assert "math" in esc_runtime.attention_kernel(model, "cpu", training=True)
    assert esc_runtime.attention_kernel(esc_arch.set_attention_backend(model, "naive")).startswith("naive")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        small_esc(attn_type="fast")


def test_upstream_backend_spellings_are_accepted():
    assert small_esc(attn_type="Flex").attn_type == "flex"


def test_esc_lte_upscales_by_any_factor_in_bounded_chunks():
    model = esc_arch.ESCLTE(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2, hidden_dim=32,
                            mlp_hidden=(32,)).eval()
    lr = torch.rand(1, 3, 10, 13)
    for factor in (1.5, 2.7, 6.3):
        out = model.upscale_by(lr, factor, max_queries=97)
        assert out.shape == (1, 3, round(10 * factor), round(13 * factor))
    whole = model.upscale_by(lr, 2.0, max_queries=10**6)
    chunked = model.upscale_by(lr, 2.0, max_queries=50)
    assert (whole - chunked).abs().max() <= 1e-6


def test_model_exposes_host_facing_attributes():
    model = esc_arch.esc_light(3)
    assert (model.arch_name, model.scale, model.window_size) == ("ESC", 3, 32)
    assert esc_arch.ESC(**model.hyperparameters).hyperparameters == model.hyperparameters


def test_training_works_after_an_inference_pass_in_the_same_process(device):
    model = small_esc(window_size=4).to(device)  # a window size no other test has cached yet
    with torch.inference_mode():
        model.eval()(torch.rand(1, 3, 8, 8, device=device))
    model.train()(torch.rand(1, 3, 8, 8, device=device)).mean().backward()
    assert model.blocks[0].attn.relative_position_bias.grad is not None


def test_weights_rewritten_through_data_are_seen_after_eval():
    """EMA updates write through ``param.data`` (no version bump); eval() must not serve stale kernels."""
    model = _randomize(small_esc()).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.plk_filter.data.mul_(3)
        model.blocks[0].attn.relative_position_bias.data.mul_(3)
        model.eval()
        after = model(x)
    assert (after - before).abs().max() > 1e-4
