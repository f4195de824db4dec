"""Every option file under options/ parses with BasicSR, names registered types and builds its networks.

The paper recipes are also checked against the official settings (spec §2), so an edit that drifts from the paper
fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import basicsr_plugin  # noqa: F401  (registers the ESC archs, datasets and models)
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.utils.options import parse_options, yaml_load
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

import esc_arch

REPO = Path(__file__).resolve().parents[1]
OPTIONS = sorted((REPO / "options").rglob("*.yml"))
CLASSIC = sorted((REPO / "options" / "train").glob("ESC_*_X[234].yml"))


def _id(path: Path) -> str:
    return str(path.relative_to(REPO / "options"))


def test_the_option_tree_is_complete():
    names = {_id(p) for p in OPTIONS}
    assert "ESC_x4.yml" in names
    for family in ("ESC_DIV2K", "ESC_light", "ESC_FP", "ESC_DFLIP"):
        for s in (2, 3, 4):
            assert {f"train/{family}_X{s}.yml", f"test/{family}_X{s}.yml", f"demo/{family}_demo_X{s}.yml"} <= names
    assert {"train/ESC_Real_X4_MSE.yml", "train/ESC_Real_X4_GAN.yml", "train/ESC_LTE.yml", "test/ESC_LTE.yml",
            "demo/ESC_Real_X4_MSE_demo.yml", "demo/ESC_Real_X4_GAN_demo.yml", "demo/ESC_LTE_demo.yml",
            "default_model/ESC_tiny_x4.yml"} <= names


@pytest.mark.parametrize("path", OPTIONS, ids=_id)
def test_option_file_parses_and_builds_its_networks(path, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "-opt", str(path)])
    is_train = "train" in path.parent.name or path.parent.name in ("options", "demo", "default_model")
    opt, _ = parse_options(str(tmp_path), is_train=is_train)
    assert opt["model_type"] in MODEL_REGISTRY
    for phase, dataset in opt["datasets"].items():
        assert dataset["type"] in DATASET_REGISTRY or dataset["type"] + "_basicsr" in DATASET_REGISTRY, phase
    for key in ("network_g", "network_d"):
        if key in opt:
            net_opt = dict(opt[key])
            assert net_opt["type"] in ARCH_REGISTRY or net_opt["type"] + "_basicsr" in ARCH_REGISTRY
            net = build_network(net_opt)
            if key == "network_g":
                assert isinstance(net, esc_arch.ESCModelBase)
                if "scale" in opt:
                    assert net.scale == opt["scale"]


@pytest.mark.parametrize("path", sorted((REPO / "options" / "demo").glob("*.yml")) + [
    REPO / "options/default_model/ESC_tiny_x4.yml"], ids=_id)
def test_cpu_variants_run_on_the_shared_data(path, monkeypatch):
    monkeypatch.chdir(REPO)
    opt = yaml_load(str(path))
    assert opt["num_gpu"] == 0
    for phase, dataset in opt["datasets"].items():
        dataset = dict(dataset, phase=phase.split("_")[0])
        if "scale" in opt:
            dataset["scale"] = opt["scale"]
        assert len(build_dataset(dataset)) > 0


@pytest.mark.parametrize("path", CLASSIC, ids=_id)
def test_classic_recipes_follow_the_paper(path):
    opt = yaml_load(str(path))
    scale, train = opt["scale"], opt["train"]
    assert opt["model_type"] == "ESRModel"
    assert train["optim_g"] == {"type": "AdamW", "lr": 5e-4, "weight_decay": 0, "betas": [0.9, 0.9]}
    assert train["scheduler"] == {"type": "MultiStepLR", "milestones": [250000, 400000, 450000, 475000, 490000],
                                  "gamma": 0.5}
    assert (train["total_iter"], train["warmup_iter"], train["ema_decay"]) == (500000, 20000, 0.999)
    assert train["pixel_opt"]["type"] == "L1Loss" and "perceptual_opt" not in train
    ds = opt["datasets"]["train"]
    assert ds["gt_size"] == 64 * scale and ds["batch_size_per_gpu"] == 16 and ds["use_hflip"] and ds["use_rot"]
    assert [d["name"] for k, d in opt["datasets"].items() if k.startswith("val")] == [
        "Set5", "Set14", "B100", "Urban100", "Manga109"]
    for metric in opt["val"]["metrics"].values():
        assert metric["crop_border"] == scale and metric["test_y_channel"] is True
    pretrain = opt["path"]["pretrain_network_g"]
    if scale == 2:
        assert pretrain is None
    else:
        assert pretrain.endswith(path.stem.replace(f"_X{scale}", "_X2") + ".pth")
        assert opt["path"]["param_key_g"] == "params_ema"
    if "DFLIP" in path.stem:
        assert ds["type"] == "DownsampleImageDataset" and ds["downsample_kernel"] == "pil"


@pytest.mark.parametrize("name", ["ESC_Real_X4_MSE", "ESC_Real_X4_GAN"])
def test_real_world_recipes_use_the_exact_degradations(name):
    opt = yaml_load(str(REPO / "options/train" / f"{name}.yml"))
    expected_top = dict(gt_usm=True, queue_size=180, gt_size=256, resize_prob=[0.2, 0.7, 0.1],
                        resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
                        poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95], second_blur_prob=0.8,
                        resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5,
                        noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4,
                        jpeg_range2=[30, 95])
    assert {k: opt[k] for k in expected_top} == expected_top
    kernels = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    probs = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    expected_ds = dict(blur_kernel_size=21, kernel_list=kernels, kernel_prob=probs, sinc_prob=0.1, blur_sigma=[0.2, 3],
                       betag_range=[0.5, 4], betap_range=[1, 2], blur_kernel_size2=21, kernel_list2=kernels,
                       kernel_prob2=probs, sinc_prob2=0.1, blur_sigma2=[0.2, 1.5], betag_range2=[0.5, 4],
                       betap_range2=[1, 2], final_sinc_prob=0.8, gt_size=256, use_hflip=True, use_rot=False,
                       batch_size_per_gpu=12, crop_pad_size=400)
    ds = opt["datasets"]["train"]
    assert {k: ds[k] for k in expected_ds} == expected_ds
    net = opt["network_g"]
    assert (net["type"], net["n_blocks"], net["exp_ratio"], net["dim"]) == ("ESCReal", 10, 2, 64)
    if name.endswith("GAN"):
        assert opt["model_type"] == "ESCRealGANModel"
        assert opt["network_d"]["type"] == "UNetDiscriminatorSN"
        assert opt["train"]["gan_opt"]["loss_weight"] == 0.1
        assert opt["train"]["perceptual_opt"]["layer_weights"] == {
            "conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1, "conv5_4": 1}
        assert (opt["l1_gt_usm"], opt["percep_gt_usm"], opt["gan_gt_usm"]) == (True, True, False)
        assert opt["path"]["param_key_g"] == "params_ema"
    else:
        assert opt["model_type"] == "ESCRealMSEModel"
        assert opt["train"]["scheduler"] == {"type": "MultiStepLR", "milestones": [100000], "gamma": 0.4}


def test_arbitrary_scale_recipe():
    opt = yaml_load(str(REPO / "options/train/ESC_LTE.yml"))
    ds = opt["datasets"]["train"]
    assert (ds["scale_min"], ds["scale_max"], ds["lq_size"], ds["sample_q"], ds["batch_size_per_gpu"]) == (
        1, 4, 64, 2304, 32)
    assert opt["network_g"]["type"] == "ESCLTE" and opt["train"]["optim_g"]["lr"] == 2e-4
    assert sorted(d["scale"] for k, d in opt["datasets"].items() if k.startswith("val")) == [2, 6]


def test_options_esc_x4_is_the_esc_x4_recipe():
    assert yaml_load(str(REPO / "options/ESC_x4.yml")) == yaml_load(str(REPO / "options/train/ESC_DIV2K_X4.yml"))
