"""Helpers for the BasicSR plugin tests: tiny image folders, tiny option files, and running train.py / test.py.

Every training run is a real subprocess of the repository's ``train.py`` (the command users type), in a temporary
working directory, so experiments/ and results/ land there and each run has its own BasicSR logger.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> Path:
    """Smooth synthetic RGB photos-alike (gradients + blurred noise) as PNG files; returns the folder."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        noise = cv2.GaussianBlur(rng.random((h, w, 3), dtype=np.float32), (0, 0), 2.0)
        ramp = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=2)
        img = np.clip(0.6 * ramp + 0.8 * (noise - 0.5) + 0.2, 0, 1)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), np.round(img * 255).astype(np.uint8))
    return folder


TINY_ESC = dict(type="ESC", dim=16, pdim=4, kernel_size=5, n_blocks=1, conv_blocks=1, window_size=8, num_heads=2,
                upscaling_factor=2, exp_ratio=1.25, use_ln=False)

PSNR_Y = {"psnr": {"type": "calculate_psnr", "crop_border": 2, "test_y_channel": True}}


def esr_options(name: str, train_dir: Path, val_dir: Path, *, scale: int = 2, total_iter: int = 4,
                save_every: int = 2, network: dict | None = None) -> dict:
    """Option dict for a tiny ESRModel run with on-the-fly downsampling (CPU, no workers)."""
    network = dict(network or TINY_ESC, upscaling_factor=scale)
    return {
        "name": name, "model_type": "ESRModel", "scale": scale, "num_gpu": 0, "manual_seed": 0,
        "datasets": {
            "train": {"name": "tiny", "type": "DownsampleImageDataset", "dataroot_gt": str(train_dir),
                      "io_backend": {"type": "disk"}, "gt_size": 16 * scale, "use_hflip": True, "use_rot": True,
                      "use_shuffle": True, "num_worker_per_gpu": 0, "batch_size_per_gpu": 2,
                      "dataset_enlarge_ratio": 1, "prefetch_mode": None},
            "val": {"name": "tinyval", "type": "DownsampleImageDataset", "dataroot_gt": str(val_dir),
                    "io_backend": {"type": "disk"}},
        },
        "network_g": network,
        "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None},
        "train": {"ema_decay": 0.9,
                  "optim_g": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0, "betas": [0.9, 0.9]},
                  "scheduler": {"type": "MultiStepLR", "milestones": [1000], "gamma": 0.5},
                  "total_iter": total_iter, "warmup_iter": -1,
                  "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"}},
        "val": {"val_freq": total_iter, "save_img": False,
                "metrics": {k: dict(v, crop_border=scale) for k, v in PSNR_Y.items()}},
        "logger": {"print_freq": 1, "save_checkpoint_freq": save_every, "use_tb_logger": False,
                   "wandb": {"project": None, "resume_id": None}},
        "dist_params": {"backend": "nccl", "port": 29500},
    }


def write_options(path: Path, opt: dict) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def env() -> dict:
    """Subprocess environment: the repo importable, one math thread per process (the CI machine has 2 cores)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_script(script: str, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> args`` in ``cwd``; the combined output is in ``.stdout``."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train(cwd: Path, opt_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = run_script("train.py", cwd, "-opt", str(opt_path), *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def experiment_log(cwd: Path, name: str, folder: str = "experiments") -> str:
    """All log files of an experiment (or test results folder), oldest first, concatenated."""
    logs = sorted((cwd / folder / name).glob("*.log"), key=lambda p: p.stat().st_mtime)
    assert logs, f"no log in {cwd / folder / name}"
    return "\n".join(p.read_text() for p in logs)


def validation_values(log: str, dataset: str, metric: str = "psnr") -> list[float]:
    """Every value of ``metric`` logged for validation set ``dataset``."""
    pattern = rf"Validation {re.escape(dataset)}\n\s+# {metric}: ([-\d.]+|nan|inf)"
    return [float(v) for v in re.findall(pattern, log)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
