"""Checkpoint I/O: what loads, what is refused, and how the refusal reads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import esc_arch
import esc_sr
from esc_arch import CheckpointError


def tiny(**kw):
    return esc_arch.ESC(dim=16, pdim=8, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2, upscaling_factor=2, **kw)


def assert_same_weights(a, b):
    assert a.hyperparameters == b.hyperparameters
    for (key, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), key


def test_save_model_round_trip_keeps_metadata(tmp_path):
    model = tiny(attn_type="naive")
    path = esc_sr.save_model(model, tmp_path / "m.safetensors")
    loaded = esc_arch.load_model(path)
    assert_same_weights(model, loaded)
    assert loaded.attn_type == "naive"  # from the metadata, not guessable from the tensors
    assert not list(tmp_path.glob("*.tmp"))


def test_save_model_half_stores_fp16(tmp_path):
    path = esc_sr.save_model(tiny(), tmp_path / "m.safetensors", half=True)
    state = esc_arch.read_state_dict(path)
    assert state["plk_filter"].dtype == torch.float16
    assert esc_arch.load_model(path).plk_filter.dtype == torch.float32  # loads into an fp32 model


@pytest.mark.parametrize("wrap", [
    lambda sd: {"params_ema": sd, "params": {k: v * 0 for k, v in sd.items()}},  # BasicSR: EMA preferred
    lambda sd: {"params": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": {"name": "esc", "args": {}, "sd": sd}, "epoch": 3},  # esc_arb layout
    lambda sd: {"metadata": {"note": "x"}, "params": sd},  # traiNNer .pth
    lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DDP
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
])
def test_wrappers_and_prefixes_are_unwrapped(tmp_path, wrap):
    model = tiny()
    path = tmp_path / "m.pth"
    torch.save(wrap(model.state_dict()), path)
    assert_same_weights(model, esc_arch.load_model(path))


def test_state_dict_source_works_without_a_file():
    model = tiny()
    assert_same_weights(model, esc_arch.load_model(model.state_dict()))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": _RunsCode()}, f)
    torch.save({"params": _RunsCode()}, tmp_path / "evil_zip.pth")
    cases = {
        path: r"a plain pickle .* which is not read",  # never unpickled at all
        tmp_path / "evil_zip.pth": r"refused by the safe \(weights-only\) loader.*not executed",
    }
    for bad, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason) as info:
            esc_arch.load_model(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.pth"
    torch.save(tiny().state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _write_truncated_safetensors(tmp_path: Path) -> Path:
    good = esc_sr.save_model(tiny(), tmp_path / "good.safetensors")
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:200])
    return bad


@pytest.mark.parametrize("make, reason", [
    (lambda d: d / "missing.pth", "no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: _write(d / "empty.pth", b""), "empty"),
    (_write_truncated, "corrupt or truncated"),
    (_write_truncated_safetensors, "corrupt or truncated"),
    (lambda d: _write(d / "junk.pth", b"PK\x03\x04 this zip ends here"), "corrupt or truncated"),
    (lambda d: _write(d / "garbage.pth", bytes(range(256)) * 4), "corrupt"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        esc_arch.load_model(path)
    message = str(info.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_model_built_under_inference_mode_runs(tmp_path):
    """ComfyUI builds and runs models inside torch.inference_mode (inference tensors have no version counter)."""
    path = esc_sr.save_model(tiny(), tmp_path / "m.safetensors")
    with torch.inference_mode():
        model = esc_arch.load_model(path)
        first = model(torch.rand(1, 3, 9, 9))
        assert model(torch.rand(1, 3, 9, 9)).shape == first.shape
    with torch.no_grad():
        model(torch.rand(1, 3, 9, 9))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"list.pth: not a state dict \(the file holds a list\)"):
        esc_arch.load_model(path)


def test_other_architecture_names_missing_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv_first.weight": torch.zeros(8, 3, 3, 3), "body.0.weight": torch.zeros(8, 8, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"other.safetensors: not an ESC checkpoint \(closest is .*needs .*plk_filter"):
        esc_arch.load_model(path)


def test_missing_keys_of_an_esc_checkpoint_are_listed(tmp_path):
    state = tiny().state_dict()
    del state["blocks.0.pconvs.0.aggr.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial.pth: does not fit ESC: missing 1 keys \(blocks.0.pconvs.0.aggr.bias\)"):
        esc_arch.load_model(path)


def test_a_checkpoint_missing_identifying_keys_names_the_closest_variant(tmp_path):
    state = tiny().state_dict()
    del state["blocks.0.conv_out.weight"]  # one of the keys the detection table looks for
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial.pth: not an ESC checkpoint \(closest is ESC, which needs blocks.0.conv_out.weight\)"):
        esc_arch.load_model(path)


def test_shape_mismatch_is_reported(tmp_path):
    state = tiny().state_dict()
    state["blocks.0.conv_out.bias"] = torch.zeros(5)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch for blocks.0.conv_out.bias: checkpoint \[5\] vs model \[16\]"):
        esc_arch.load_model(path)


@pytest.mark.parametrize("factory, arch", [
    (lambda: esc_arch.esc_xl(2, dim=48, pdim=16, n_blocks=1, conv_blocks=1, num_heads=3), "ESC"),
    (lambda: esc_arch.esc_fp(3, n_blocks=1, conv_blocks=1), "ESCFP"),
    (lambda: esc_arch.esc_real(4, n_blocks=1, conv_blocks=1), "ESCReal"),
    (lambda: esc_arch.esc_real(2, upsampler="nearest+conv-neosr", n_blocks=1, conv_blocks=1), "ESCReal"),
    (lambda: esc_arch.esc_real(4, upsampler="dysample", n_blocks=1, conv_blocks=1), "ESCReal"),
    (lambda: esc_arch.esc_realm(1, upsampler="pixelshuffle", n_blocks=1, conv_blocks=1), "ESCRealM"),
    (lambda: esc_arch.esc_realm(2, upsampler="transpose+conv", unshuffle_mod=False, n_blocks=1, conv_blocks=1), "ESCRealM"),
    (lambda: esc_arch.esc_lte(n_blocks=1, conv_blocks=2, mlp_hidden=(64, 32)), "ESCLTE"),
])
def test_hyperparameters_are_inferred_from_tensors_alone(factory, arch):
    model = factory()
    cls, kwargs = esc_arch.infer_architecture(model.state_dict())
    assert cls.arch_name == arch
    expected = dict(model.hyperparameters)
    expected.pop("attn_type")
    assert {k: v for k, v in kwargs.items()} == expected


def test_embedded_default_model_is_small_fp16_and_loads_by_name():
    from esc_arch.checkpoint import DEFAULT_MODEL_FILE

    assert DEFAULT_MODEL_FILE.stat().st_size < 2 * 2**20
    assert esc_arch.read_state_dict(DEFAULT_MODEL_FILE)["plk_filter"].dtype == torch.float16
    model = esc_arch.load_model("default")
    assert (model.arch_name, model.scale, model.hyperparameters) == ("ESC", 4, esc_arch.esc_tiny(4).hyperparameters)
