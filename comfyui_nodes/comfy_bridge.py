"""The only place the node pack touches ComfyUI's own modules.

ComfyUI's modules (``comfy.model_management``, ``comfy.utils``, ``folder_paths``) exist only
inside a running ComfyUI, so they are imported lazily, when a node runs or lists its inputs.
That keeps ``import comfyui_nodes`` possible anywhere (packaging, docs, unit tests with
stand-in modules) and means device choice and memory management always come from ComfyUI:
this pack never names a device itself.

Features that differ between ComfyUI versions are detected, never assumed:

* ``model_management.is_oom`` (newer) vs. ``OOM_EXCEPTION`` (0.3.x);
* ``comfy.model_patcher.CoreModelPatcher`` (newest, needed by its stock upscale node as
  ``upscale_model.patcher``) vs. ``ModelPatcher`` vs. neither.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

UPSCALE_MODELS_FOLDER = "upscale_models"


def model_management() -> ModuleType:
    return importlib.import_module("comfy.model_management")


def comfy_utils() -> ModuleType:
    return importlib.import_module("comfy.utils")


def folder_paths() -> ModuleType:
    return importlib.import_module("folder_paths")


def upscale_model_names() -> list[str]:
    """File names in ComfyUI's ``models/upscale_models`` folders (re-read on every /object_info)."""
    return folder_paths().get_filename_list(UPSCALE_MODELS_FOLDER)


def upscale_model_path(name: str) -> str:
    """Absolute path of an ``upscale_models`` file; a clear error if it is not there."""
    paths = folder_paths()
    path = paths.get_full_path(UPSCALE_MODELS_FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"{name}: no such file in ComfyUI's {UPSCALE_MODELS_FOLDER} folders")
    return path


def torch_device() -> torch.device:
    """The device ComfyUI runs models on (respects --cpu, DirectML, MPS, XPU, ...)."""
    return model_management().get_torch_device()


def offload_device() -> torch.device:
    """Where ComfyUI parks models between runs."""
    return model_management().unet_offload_device()


def free_memory_for(bytes_required: float, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until ``bytes_required`` fit on ``device``."""
    model_management().free_memory(bytes_required, device)


def empty_cache() -> None:
    model_management().soft_empty_cache()


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    model_management().throw_exception_if_processing_interrupted()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error of the device (any ComfyUI version)."""
    mm = model_management()
    is_oom = getattr(mm, "is_oom", None)
    if callable(is_oom):
        return bool(is_oom(error))
    if isinstance(error, torch.OutOfMemoryError):
        return True
    oom_type = getattr(mm, "OOM_EXCEPTION", None)
    # 0.3.x sets OOM_EXCEPTION = Exception when torch lacks a CUDA OOM type; that would make every error an OOM.
    return isinstance(oom_type, type) and oom_type is not Exception and isinstance(error, oom_type)


def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ComfyUI considers ``dtype`` usable for compute on ``device``."""
    if dtype == torch.float32:
        return True
    mm = model_management()
    if dtype == torch.float16:
        return bool(mm.should_use_fp16(device, prioritize_performance=False))
    if dtype == torch.bfloat16:
        return bool(mm.should_use_bf16(device, prioritize_performance=False))
    return False


def progress_bar(total: int) -> Any:
    """A ``comfy.utils.ProgressBar`` (drives the node's progress in the UI and the websocket)."""
    return comfy_utils().ProgressBar(total)


def attach_patcher(descriptor: Any) -> None:
    """Give an UPSCALE_MODEL the ``.patcher`` that newer stock upscale nodes expect.

    Newer ComfyUI's "Load Upscale Model" attaches a ModelPatcher around the network and its
    "Upscale Image (using Model)" reads ``upscale_model.patcher.load_device`` and loads it
    through ``load_models_gpu``.  0.3.x has no such attribute on the stock path, so nothing
    is attached when the patcher class is missing.
    """
    try:
        patcher_module = importlib.import_module("comfy.model_patcher")
    except ImportError:
        return
    patcher_cls = getattr(patcher_module, "CoreModelPatcher", None) or getattr(patcher_module, "ModelPatcher", None)
    if patcher_cls is None:
        return
    descriptor.patcher = patcher_cls(descriptor.model, load_device=torch_device(), offload_device=offload_device())
