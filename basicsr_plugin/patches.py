"""Narrow fixes to BasicSR for CPU-only and multi-process runs, applied from the plugin (site-packages untouched).

Each fix replaces one name and leaves the CUDA path as stock BasicSR has it:

1. ``basicsr.train.load_resume_state``: stock calls ``torch.cuda.current_device()`` and maps the state onto CUDA,
   which fails on a CPU torch. The replacement maps to CPU unless the run uses a GPU, looks for states in the
   experiment's own ``training_states`` folder (stock looks relative to the CWD), skips states whose network
   checkpoint is missing, and loads with ``weights_only=True``.
2. ``basicsr.utils.options.init_dist``: stock ``--launcher pytorch`` always uses nccl and calls
   ``torch.cuda.set_device(rank % device_count)`` (ZeroDivisionError without a GPU). Without CUDA the replacement
   initialises a gloo process group instead; with CUDA it calls the original.
3. ``BaseModel.model_to_device``: stock wraps DDP with ``device_ids=[torch.cuda.current_device()]``. On CPU the
   replacement wraps without ``device_ids``; on CUDA it calls the original.
4. ``filter2D`` as used by the Real-ESRGAN models: on CPU, DiffJPEG returns a permuted (non-contiguous) tensor and
   ``filter2D``'s ``view`` fails; the wrapper passes contiguous tensors (a no-op where they already are). On CPU it
   also filters by FFT: the degradation's 21x21 blurs and USMSharp's 51x51 Gaussian as direct depthwise
   convolutions took 86 % of a training iteration (benchmarks/README.md, "Real-world training"). The same
   reflect padding and the same correlation, to float rounding; CUDA keeps the direct convolution.
"""

from __future__ import annotations

import os
import re

import torch

_applied = False


def _state_iter(name: str) -> int | None:
    match = re.fullmatch(r"(\d+)\.state", name)
    return int(match.group(1)) if match else None


def find_latest_resume_state(opt: dict) -> str | None:
    """The newest ``<iter>.state`` of this experiment whose ``net_g_<iter>.pth`` also exists, or None."""
    folder = opt["path"].get("training_states") or os.path.join("experiments", opt["name"], "training_states")
    models_dir = opt["path"].get("models") or os.path.join(os.path.dirname(folder), "models")
    if not os.path.isdir(folder):
        return None
    iters = sorted((i for i in map(_state_iter, os.listdir(folder)) if i is not None), reverse=True)
    for it in iters:
        if os.path.isfile(os.path.join(models_dir, f"net_g_{it}.pth")):
            return os.path.join(folder, f"{it}.state")
    return None


def load_resume_state(opt: dict):
    """Device-aware replacement for ``basicsr.train.load_resume_state`` (see the module docstring)."""
    from basicsr.utils.misc import check_resume

    if opt.get("auto_resume"):
        path = find_latest_resume_state(opt)
        if path is not None:
            opt["path"]["resume_state"] = path
    else:
        path = opt["path"].get("resume_state")
    if not path:
        return None
    if opt.get("num_gpu", 0) != 0 and torch.cuda.is_available():
        map_location = torch.device("cuda", torch.cuda.current_device())
    else:
        map_location = torch.device("cpu")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise RuntimeError(f"{path}: cannot load training state ({error})") from error
    check_resume(opt, state["iter"])
    return state


def _make_init_dist(original):
    def init_dist(launcher, backend="nccl", **kwargs):
        if launcher == "pytorch" and not torch.cuda.is_available():
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo", **kwargs)
            return None
        return original(launcher, backend, **kwargs)

    init_dist.__wrapped__ = original
    return init_dist


def _make_model_to_device(original):
    def model_to_device(self, net):
        if self.opt.get("dist") and self.device.type != "cuda":
            from torch.nn.parallel import DistributedDataParallel

            net = net.to(self.device)
            return DistributedDataParallel(net, find_unused_parameters=self.opt.get("find_unused_parameters", False))
        return original(self, net)

    model_to_device.__wrapped__ = original
    return model_to_device


def fft_filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """BasicSR's ``filter2D`` (reflect-pad by k // 2, correlate with one k x k kernel per image or one for all) by FFT.

    ``img``: (b, c, h, w); ``kernel``: (b, k, k) or (1, k, k), k odd.
    """
    k = kernel.size(-1)
    if k % 2 == 0:
        raise ValueError("Wrong kernel size")
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (k // 2,) * 4, mode="reflect")
    ph, pw = padded.shape[-2:]
    # Correlation = convolution with the flipped kernel; of the circular convolution over the padded size, the
    # entries from k - 1 on are the linear ones (the "valid" part, h x w).
    spectrum = torch.fft.rfft2(kernel.flip(-1, -2).to(img.dtype), s=(ph, pw)).unsqueeze(1)
    out = torch.fft.irfft2(torch.fft.rfft2(padded) * spectrum, s=(ph, pw))
    return out[..., k - 1 :, k - 1 :].contiguous()


def _make_contiguous_filter2d(original):
    def filter2D(img, kernel):  # noqa: N802  (same name as the wrapped BasicSR function)
        if img.device.type == "cpu":
            return fft_filter2d(img, kernel)
        return original(img.contiguous(), kernel.contiguous())

    filter2D.__wrapped__ = original
    return filter2D


def apply() -> None:
    """Install the fixes (idempotent)."""
    global _applied
    if _applied:
        return
    import basicsr.models.realesrgan_model as realesrgan_model
    import basicsr.models.realesrnet_model as realesrnet_model
    import basicsr.train
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel

    basicsr.train.load_resume_state = load_resume_state
    basicsr.utils.options.init_dist = _make_init_dist(basicsr.utils.options.init_dist)
    BaseModel.model_to_device = _make_model_to_device(BaseModel.model_to_device)
    import basicsr.utils.img_process_util as img_process_util  # USMSharp's filter2D

    for module in (realesrnet_model, realesrgan_model, img_process_util):
        module.filter2D = _make_contiguous_filter2d(module.filter2D)
    _applied = True
