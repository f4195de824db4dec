"""End-to-end BasicSR training with the ESC plugin on CPU: the real train.py / test.py pipelines on tiny data.

Covers: ESRModel training + validation + the official padded test protocol, checkpoints that load in esc_arch,
x4 fine-tuning from an x2 checkpoint (head resize), kill -9 then --auto_resume with atomic checkpoints.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import esc_arch
from basicsr_support import (
    REPO, env, esr_options, experiment_log, run_script, train, validation_values, write_images, write_options,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("basicsr_data")
    return {"train": write_images(root / "train", 4, (64, 72), seed=1),
            "val": write_images(root / "val", 2, (48, 56), seed=2)}


@pytest.fixture(scope="module")
def x2_run(tmp_path_factory, data) -> Path:
    """One real 4-iteration x2 training run (checkpoints and validation at 2 and 4), shared by several tests."""
    cwd = tmp_path_factory.mktemp("x2_run")
    opt = esr_options("tiny_x2", data["train"], data["val"])
    opt["val"]["val_freq"] = 2  # validating twice checks that the second one sees the updated EMA weights
    opt = write_options(cwd / "x2.yml", opt)
    train(cwd, opt)
    return cwd


def test_training_writes_params_and_ema_and_validates(x2_run):
    models = x2_run / "experiments" / "tiny_x2" / "models"
    assert sorted(p.name for p in models.glob("*.pth")) == ["net_g_2.pth", "net_g_4.pth", "net_g_latest.pth"]
    ckpt = torch.load(models / "net_g_latest.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"params", "params_ema"}
    # EMA (decay 0.9) lags the trained weights, so the two copies differ.
    assert any(not torch.equal(ckpt["params"][k], ckpt["params_ema"][k]) for k in ckpt["params"])
    log = experiment_log(x2_run, "tiny_x2")
    # No attn_type in the YAML: the fastest correct CPU back ends, naive to train, sdpa (flash) for the EMA copy.
    assert "network_g.attn_type not set: using 'naive' (fastest correct on cpu)" in log
    assert "net_g_ema (inference only) uses attn_type 'sdpa'" in log
    psnrs = validation_values(log, "tinyval")
    assert len(psnrs) == 3 and all(10 < v < 60 for v in psnrs)  # at iter 2, iter 4, and after training
    assert not list(models.glob(".*tmp")), "temporary checkpoint files left behind"


def test_checkpoint_loads_unchanged_in_esc_arch(x2_run):
    path = x2_run / "experiments" / "tiny_x2" / "models" / "net_g_latest.pth"
    model = esc_arch.load_model(str(path))
    assert model.arch_name == "ESC" and model.scale == 2 and model.window_size == 8
    reference = esc_arch.ESC(**{k: v for k, v in esr_options("x", Path("."), Path("."))["network_g"].items() if k != "type"})
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["params_ema"])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)


def test_test_py_reproduces_the_training_validation(x2_run, data):
    """test.py loads params_ema into the network and runs the padded protocol: the same PSNR as the last validation.

    The training-time validation at iter 4 follows one at iter 2: it must not reuse kernels cached from the EMA
    weights of iter 2 (BasicSR's EMA update does not bump the parameters' version counters).
    """
    opt = esr_options("tiny_x2", data["train"], data["val"])
    test_opt = {
        "name": "tiny_x2_test", "model_type": "ESRModel", "scale": 2, "num_gpu": 0, "manual_seed": 0,
        "datasets": {"test_1": dict(opt["datasets"]["val"], name="tinyval")},
        "network_g": opt["network_g"],
        "path": {"pretrain_network_g": str(x2_run / "experiments/tiny_x2/models/net_g_latest.pth"),
                 "param_key_g": "params_ema", "strict_load_g": True},
        "val": {"save_img": True, "suffix": None, "metrics": opt["val"]["metrics"]},
    }
    result = run_script("test.py", x2_run, "-opt", str(write_options(x2_run / "test.yml", test_opt)))
    assert result.returncode == 0, result.stdout[-4000:]
    tested = validation_values(experiment_log(x2_run, "tiny_x2_test", "results"), "tinyval")
    trained = validation_values(experiment_log(x2_run, "tiny_x2"), "tinyval")
    assert tested == [pytest.approx(trained[-1], abs=1e-4)]
    images = sorted((x2_run / "results/tiny_x2_test/visualization/tinyval").glob("*.png"))
    assert [p.name for p in images] == ["img00_tiny_x2_test.png", "img01_tiny_x2_test.png"]


def test_x4_starts_from_the_x2_checkpoint_with_a_resized_head(x2_run, data):
    opt = esr_options("tiny_x4", data["train"], data["val"], scale=4, total_iter=1, save_every=1)
    opt["path"].update(pretrain_network_g=str(x2_run / "experiments/tiny_x2/models/net_g_latest.pth"),
                       param_key_g="params_ema")
    train(x2_run, write_options(x2_run / "x4.yml", opt))
    log = experiment_log(x2_run, "tiny_x4")
    assert "Loading ESC model from" in log and "Size different" not in log
    x4 = torch.load(x2_run / "experiments/tiny_x4/models/net_g_1.pth", map_location="cpu", weights_only=True)
    assert x4["params"]["to_img.weight"].shape[0] == 3 * 4**2


def _wait_for_states(folder: Path, count: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        if folder.is_dir() and len([p for p in folder.iterdir() if p.name.endswith(".state")]) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} training states in {folder} after {timeout} s")


def test_kill_9_then_auto_resume_continues_from_the_last_saved_iteration(tmp_path, data):
    opt = esr_options("killed", data["train"], data["val"], total_iter=10_000, save_every=1)
    opt["val"]["val_freq"] = 10_000
    opt_path = write_options(tmp_path / "killed.yml", opt)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-opt", str(opt_path)], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    states = tmp_path / "experiments/killed/training_states"
    models = tmp_path / "experiments/killed/models"
    try:
        _wait_for_states(states, 3, proc, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a checkpoint is written every iteration: the kill may land mid-save
        proc.wait()
        proc.stdout.close()

    # No checkpoint file is ever truncated: every visible .pth/.state loads completely.
    saved = sorted(int(p.stem) for p in states.glob("*.state"))
    for p in [*models.glob("*.pth"), *states.glob("*.state")]:
        torch.load(p, map_location="cpu", weights_only=True)
    last = max(i for i in saved if (models / f"net_g_{i}.pth").exists())

    opt["train"]["total_iter"] = last + 2
    train(tmp_path, write_options(opt_path, opt), "--auto_resume")
    log = experiment_log(tmp_path, "killed")
    assert re.search(rf"Resuming training from epoch: \d+, iter: {last}\.", log)
    after_resume = log.split("Resuming training from", 1)[1]
    assert [int(i) for i in re.findall(r"iter:\s+(\d+),", after_resume)] == [last + 1, last + 2]
    assert (models / f"net_g_{last + 2}.pth").exists() and (models / "net_g_latest.pth").exists()
    resumed = torch.load(states / f"{last + 2}.state", map_location="cpu", weights_only=True)
    assert resumed["iter"] == last + 2


def test_checkpoint_loads_unchanged_in_spandrel(x2_run):
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import spandrel

    import esc_arch.spandrel

    esc_arch.spandrel.install()
    path = x2_run / "experiments" / "tiny_x2" / "models" / "net_g_latest.pth"
    descriptor = spandrel.ModelLoader().load_from_file(str(path))
    assert descriptor.architecture.id == "ESC" and descriptor.scale == 2
    reference = esc_arch.load_model(str(path))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(descriptor.model.eval()(x), reference(x), rtol=0, atol=0)
