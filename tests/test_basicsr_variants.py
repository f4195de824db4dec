"""The other training set-ups on CPU: 2-process torchrun DDP (gloo), Real-ESRGAN MSE + GAN, arbitrary-scale ESC+LTE."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import esc_arch
from basicsr_support import (
    REPO, env, esr_options, experiment_log, free_port, run_script, train, validation_values, write_images, write_options,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variant_data")
    return {"train": write_images(root / "train", 4, (80, 80), seed=3),
            "val": write_images(root / "val", 1, (96, 96), seed=4)}


def test_torchrun_ddp_on_cpu_keeps_both_ranks_identical(tmp_path, data):
    opt = esr_options("ddp", data["train"], data["val"], total_iter=4, save_every=2)
    opt_path = write_options(tmp_path / "ddp.yml", opt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "train.py"), "-opt", str(opt_path), "--launcher", "pytorch"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    log = experiment_log(tmp_path, "ddp")
    assert "world_size: 2" in log and "dist: True" in log
    # At every checkpoint (iters 2, 4 and the final one) both ranks' weights, EMA included, were compared.
    checks = re.findall(r"Replica check at (iter \d+|end): 2 ranks, (\d+) values, max \|difference\| = (\S+)", log)
    assert [c[0] for c in checks] == ["iter 2", "iter 4", "end"]
    assert all(int(n) > 0 and float(d) == 0.0 for _, n, d in checks)
    assert validation_values(log, "tinyval")


@pytest.mark.parametrize("entry", ["train", "test"])
@pytest.mark.parametrize("fails", [False, True], ids=["finishes", "raises"])
def test_entry_points_leave_the_process_group_they_ran_in(monkeypatch, entry, fails):
    """BasicSR leaves ``--launcher pytorch``'s group alive; gloo threads torn down at interpreter exit can abort a rank
    (SIGABRT) after a run that finished, so esc-train and esc-test destroy the group, also when the pipeline raised."""
    import importlib

    import torch.distributed as dist

    from basicsr_plugin import entry as entries

    def pipeline(root_path):
        assert dist.is_initialized()
        if fails:
            raise RuntimeError("pipeline failed")

    monkeypatch.setattr(importlib.import_module(f"basicsr.{entry}"), f"{entry}_pipeline", pipeline)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the entry points set sys.argv from their argument list
    main = getattr(entries, f"{entry}_main")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="pipeline failed"):
                main([])
        else:
            main([])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_divergence(rank: int, world: int, port: int, queue) -> None:
    """Worker: two gloo ranks whose weights differ in one value; the replica check must refuse to continue."""
    import torch.distributed as dist

    from basicsr_plugin.models.mixins import AtomicCheckpointMixin

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Host(AtomicCheckpointMixin):
        opt = {"dist": True, "rank": rank, "train": {}}

        def __init__(self):
            torch.manual_seed(0)
            self.net_g = torch.nn.Linear(4, 4)
            if rank == 1:
                with torch.no_grad():
                    self.net_g.weight[0, 0] += 0.5

        def get_bare_model(self, net):
            return net

    try:
        Host().check_replicas_in_sync(7)
        queue.put((rank, "no error"))
    except RuntimeError as error:
        queue.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_replica_check_detects_diverged_ranks():
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_check_divergence, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] == "DDP replicas diverged at iter 7: max |weight difference| between ranks = 0.5"


TINY_REAL = dict(type="ESCReal", dim=16, pdim=4, kernel_size=5, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                 upscaling_factor=4, exp_ratio=2.0)

DEGRADATION = dict(
    gt_usm=True, queue_size=4, gt_size=64,
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
    poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95],
    second_blur_prob=0.8, resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5,
    noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4, jpeg_range2=[30, 95],
)


def _real_options(name: str, model_type: str, data: dict, total_iter: int) -> dict:
    opt = esr_options(name, data["train"], data["val"], scale=4, total_iter=total_iter, save_every=total_iter,
                      network=TINY_REAL)
    opt["model_type"] = model_type
    opt.update(DEGRADATION)
    opt["datasets"]["train"] = {
        "name": "tiny", "type": "RealESRGANDataset", "dataroot_gt": str(data["train"]), "io_backend": {"type": "disk"},
        "crop_pad_size": 96, "gt_size": 64, "use_hflip": True, "use_rot": False,
        "blur_kernel_size": 21, "kernel_list": ["iso", "aniso", "generalized_iso", "generalized_aniso",
                                                "plateau_iso", "plateau_aniso"],
        "kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], "sinc_prob": 0.1, "blur_sigma": [0.2, 3],
        "betag_range": [0.5, 4], "betap_range": [1, 2],
        "blur_kernel_size2": 21, "kernel_list2": ["iso", "aniso", "generalized_iso", "generalized_aniso",
                                                  "plateau_iso", "plateau_aniso"],
        "kernel_prob2": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], "sinc_prob2": 0.1, "blur_sigma2": [0.2, 1.5],
        "betag_range2": [0.5, 4], "betap_range2": [1, 2], "final_sinc_prob": 0.8,
        "use_shuffle": True, "num_worker_per_gpu": 0, "batch_size_per_gpu": 2, "dataset_enlarge_ratio": 1,
        "prefetch_mode": None,
    }
    return opt


def test_real_esrgan_rejects_a_gt_crop_too_small_for_the_degradation(tmp_path, data):
    opt = _real_options("real_small", "ESCRealMSEModel", data, total_iter=1)
    opt["datasets"]["train"].update(crop_pad_size=64, gt_size=64)
    result = run_script("train.py", tmp_path, "-opt", str(write_options(tmp_path / "small.yml", opt)))
    assert result.returncode != 0
    assert "GT crop 64x64 is too small for the Real-ESRGAN degradation" in result.stdout
    assert "set the dataset's crop_pad_size to at least 74" in result.stdout


def test_real_esrgan_mse_then_gan_on_cpu(tmp_path, data):
    mse = _real_options("real_mse", "ESCRealMSEModel", data, total_iter=2)
    train(tmp_path, write_options(tmp_path / "mse.yml", mse))
    mse_log = experiment_log(tmp_path, "real_mse")
    assert len(validation_values(mse_log, "tinyval")) == 2
    mse_ckpt = tmp_path / "experiments/real_mse/models/net_g_latest.pth"

    # The perceptual loss loads VGG19 from this CWD-relative path; random weights keep the test offline.
    import torchvision

    vgg_path = tmp_path / "experiments/pretrained_models/vgg19-dcbb9e9d.pth"
    vgg_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), vgg_path)

    gan = _real_options("real_gan", "ESCRealGANModel", data, total_iter=2)
    gan.update(l1_gt_usm=True, percep_gt_usm=True, gan_gt_usm=False)
    gan["network_d"] = {"type": "UNetDiscriminatorSN", "num_in_ch": 3, "num_feat": 8, "skip_connection": True}
    gan["path"].update(pretrain_network_g=str(mse_ckpt), param_key_g="params_ema")
    gan["train"].update(
        optim_d={"type": "Adam", "lr": 1e-4, "weight_decay": 0, "betas": [0.9, 0.99]},
        perceptual_opt={"type": "PerceptualLoss", "layer_weights": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1,
                                                                     "conv4_4": 1, "conv5_4": 1},
                        "vgg_type": "vgg19", "use_input_norm": True, "perceptual_weight": 1.0, "style_weight": 0,
                        "range_norm": False, "criterion": "l1"},
        gan_opt={"type": "GANLoss", "gan_type": "vanilla", "real_label_val": 1.0, "fake_label_val": 0.0,
                 "loss_weight": 0.1},
        net_d_iters=1, net_d_init_iters=0,
    )
    gan["train"]["optim_g"] = {"type": "Adam", "lr": 1e-4, "weight_decay": 0, "betas": [0.9, 0.99]}
    train(tmp_path, write_options(tmp_path / "gan.yml", gan))
    log = experiment_log(tmp_path, "real_gan")
    for term in ("l_g_pix", "l_g_percep", "l_g_gan", "l_d_real", "l_d_fake"):
        assert re.search(rf"{term}: [-\d.e+]+", log), term
    models = tmp_path / "experiments/real_gan/models"
    assert (models / "net_g_latest.pth").exists() and (models / "net_d_latest.pth").exists()
    model = esc_arch.load_model(str(models / "net_g_latest.pth"))
    assert model.arch_name == "ESCReal" and model.scale == 4


def test_arbitrary_scale_training_validates_at_x2_and_unseen_x6(tmp_path, data):
    opt = esr_options("lte", data["train"], data["val"], total_iter=2, save_every=2)
    opt.pop("scale")
    opt["model_type"] = "ArbitraryScaleModel"
    opt["network_g"] = dict(type="ESCLTE", dim=16, pdim=4, kernel_size=5, n_blocks=1, conv_blocks=1, window_size=8,
                            num_heads=2, exp_ratio=1.25, hidden_dim=16, mlp_hidden=[16])
    opt["train"]["ema_decay"] = 0
    opt["datasets"] = {
        "train": {"name": "tiny", "type": "ArbitraryScaleDataset", "dataroot_gt": str(data["train"]),
                  "io_backend": {"type": "disk"}, "lq_size": 16, "scale_min": 1, "scale_max": 4, "sample_q": 64,
                  "use_hflip": True, "use_rot": True, "use_shuffle": True, "num_worker_per_gpu": 0,
                  "batch_size_per_gpu": 2, "dataset_enlarge_ratio": 1, "prefetch_mode": None},
        "val_1": {"name": "tiny_x2", "type": "ArbitraryScaleDataset", "dataroot_gt": str(data["val"]), "scale": 2,
                  "io_backend": {"type": "disk"}},
        "val_2": {"name": "tiny_x6", "type": "ArbitraryScaleDataset", "dataroot_gt": str(data["val"]), "scale": 6,
                  "io_backend": {"type": "disk"}},
    }
    opt["val"]["metrics"] = {"psnr": {"type": "calculate_psnr", "crop_border": "auto", "test_y_channel": True}}
    opt["val"]["max_queries"] = 1000  # several decoder chunks per image
    train(tmp_path, write_options(tmp_path / "lte.yml", opt))
    log = experiment_log(tmp_path, "lte")
    x2, x6 = validation_values(log, "tiny_x2"), validation_values(log, "tiny_x6")
    assert len(x2) == len(x6) == 2
    # The decoder adds a bilinear upsampling of the input, so even a barely trained model is far from noise.
    assert all(15 < v < 60 for v in x2 + x6) and x2[-1] > x6[-1]
    model = esc_arch.load_model(str(tmp_path / "experiments/lte/models/net_g_latest.pth"))
    assert model.arch_name == "ESCLTE"
    out = model.upscale_by(torch.rand(1, 3, 10, 12), 2.5)
    assert out.shape == (1, 3, 25, 30)


def test_clean_prob_gives_that_share_of_a_batch_the_plain_bicubic_input():
    """``clean_prob`` (the real-world campaign's option) swaps chosen inputs for the antialiased bicubic /4 of their
    targets, rounded to 8 bits as the synthesised inputs are; the others keep their degraded input."""
    import torch.nn.functional as F

    from basicsr_plugin.models.realesrgan_models import ESCRealMSEModel

    model = object.__new__(ESCRealMSEModel)  # the method needs only the batch, not a network
    torch.manual_seed(0)
    model.gt = torch.rand(64, 3, 32, 32)
    degraded = torch.rand(64, 3, 8, 8)
    model.lq = degraded.clone()
    model._mix_clean_pairs(0.5)

    clean = (F.interpolate(model.gt, size=(8, 8), mode="bicubic", antialias=True) * 255).round().clamp(0, 255) / 255
    swapped = (model.lq - clean).abs().amax(dim=(1, 2, 3)) == 0
    kept = (model.lq - degraded).abs().amax(dim=(1, 2, 3)) == 0
    assert bool((swapped ^ kept).all())  # every input is one or the other
    assert 16 <= int(swapped.sum()) <= 48  # about half of 64

    model.lq = degraded.clone()
    model._mix_clean_pairs(0.0)
    assert torch.equal(model.lq, degraded)
