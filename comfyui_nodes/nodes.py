"""The ESC nodes (ComfyUI's V1 node API, so they run on ComfyUI before and after the V3 schema).

Every node is a thin adapter: checkpoints load through :func:`esc_arch.load_model`, images go
through :func:`esc_sr.upscale` (the one tiling engine), and the device, memory, progress and
interrupts come from ComfyUI via :mod:`comfyui_nodes.comfy_bridge`.

ComfyUI tensors: ``IMAGE`` is ``[B, H, W, C]`` float in 0..1 (C = 3, or 4 with alpha);
``MASK`` is ``[B, H, W]`` with 1 = masked, i.e. ``1 - alpha`` (what LoadImage produces).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

import esc_arch
import esc_sr
from esc_sr.alpha import fit_alpha, join_alpha, split_alpha
from esc_sr import facts, memory, precision as precision_policy

from . import comfy_bridge as bridge
from .model_handle import PRECISION_ATTRIBUTE, esc_network, precision_preference
from .spandrel_bridge import describe

CATEGORY = "image/upscaling"
# ComfyUI's combo inputs are lists; the choices are esc_sr's (esc_sr/facts.py).
PRECISIONS = list(facts.PRECISIONS)
ATTENTION_BACKENDS = ["auto", *facts.ATTENTION_BACKENDS]  # auto: the model's own
ALPHA_MODES = list(facts.ALPHA_MODES)
EMBEDDED_PREFIX = "[embedded] "  # the loader lists esc_arch.EMBEDDED_MODELS under these names
MAX_TILE = 4096
MAX_FACTOR = 16.0

_TILE_INPUT = ("INT", {"default": 0, "min": 0, "max": MAX_TILE, "step": 8,
                       "tooltip": "Tile side in input pixels; 0 = automatic (the largest tile that fits in free memory)."})
_OVERLAP_INPUT = ("INT", {"default": facts.DEFAULT_OVERLAP, "min": 0, "max": 256, "step": 8,
                          "tooltip": "Input pixels of context around each tile; the default gives seamless results."})
_PRECISION_INPUT = (PRECISIONS, {"default": facts.DEFAULT_PRECISION,
                                 "tooltip": "auto = the loader's choice, else what ComfyUI considers safe on this device."})
_ALPHA_INPUT = (ALPHA_MODES, {"default": facts.DEFAULT_ALPHA,
                              "tooltip": "How alpha is upscaled: through the model as a gray image, or with a Lanczos resize."})
_MASK_INPUT = ("MASK", {"tooltip": "Alpha for an RGB image, as ComfyUI masks it (1 = transparent), e.g. LoadImage's mask."})


# --------------------------------------------------------------------------------------- helpers


def _resolve_precision(choice: str, upscale_model: Any, device: torch.device) -> str:
    """The engine precision for this run: explicit > the loader's preference > esc_sr's rule for "auto"
    (:func:`esc_sr.precision.choose`: the model's ``supports_half``, then the device), with ComfyUI's advice on
    which half precision this GPU runs well (it honours --force-fp32 / --fp16-* flags)."""
    if choice == "auto":
        choice = precision_preference(upscale_model)
    return precision_policy.choose(choice, device, esc_network(upscale_model),
                                   runs=lambda dtype: bridge.supports_dtype(device, dtype))


def _check_image(image: torch.Tensor) -> None:
    """Refuse, in one line, an IMAGE that is not ``[B, H, W, 3]`` (RGB) or ``[B, H, W, 4]`` (RGBA).

    Anything else has no documented meaning here: a 2-channel tensor is not gray + alpha in ComfyUI, and taking the
    first 3 of 5 channels would silently drop the rest."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        shape = "x".join(str(n) for n in image.shape)
        what = (f"{image.shape[-1]} channel{'s' * (image.shape[-1] != 1)}" if image.ndim == 4
                else f"{image.ndim} dimensions")
        raise ValueError(f"the IMAGE has {what} (shape {shape}); the ESC nodes take RGB or RGBA images "
                         "[batch, height, width, 3 or 4]")


def _finite_mask(mask: torch.Tensor) -> torch.Tensor:
    """The MASK with NaN and -Inf as 0 and +Inf as 1, with a warning that names the mask (not the image)."""
    if not mask.is_floating_point() or bool(torch.isfinite(mask).all()):
        return mask
    bad = int((~torch.isfinite(mask)).sum())
    warnings.warn(f"the MASK has {bad:,} non-finite value{'s' * (bad != 1)} (NaN or Inf); replaced: NaN and -Inf "
                  "by 0 (opaque), +Inf by 1 (transparent)", RuntimeWarning, stacklevel=3)
    return torch.nan_to_num(mask, nan=0.0, posinf=1.0, neginf=0.0)


def _alpha_from_inputs(image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an IMAGE into RGB and alpha (``[B,1,H,W]``), taking alpha from the image or a MASK (fitted to the
    image by :func:`esc_sr.alpha.fit_alpha`)."""
    _check_image(image)
    if mask is not None:
        if mask.ndim not in (2, 3):
            raise ValueError(f"the MASK has {mask.ndim} dimensions (shape {'x'.join(map(str, mask.shape))}); "
                             "a MASK is [batch, height, width]")
        mask = _finite_mask(mask)
    rgb = image[..., :3].movedim(-1, 1)
    if image.shape[-1] == 4:
        return rgb, image[..., 3:4].movedim(-1, 1)
    if mask is None or not bool(mask.any()):
        # No mask, or LoadImage's all-zero placeholder for an image without alpha: fully opaque.
        return rgb, None
    alpha = 1.0 - (mask if mask.ndim == 3 else mask.unsqueeze(0)).to(rgb).unsqueeze(1)  # a MASK is 1 - alpha
    return rgb, fit_alpha(alpha, rgb)


def model_choices() -> list[str]:
    """The loader's ``model_name`` choices: the files of ``upscale_models`` (re-read on every call), then the models
    embedded in esc-sr (:data:`esc_arch.EMBEDDED_MODELS`) as ``[embedded] NAME``."""
    return [*bridge.upscale_model_names(), *(EMBEDDED_PREFIX + name for name in esc_arch.EMBEDDED_MODELS)]


def embedded_model(model_name: str) -> str | None:
    """The :func:`esc_arch.load_model` name of an ``[embedded] NAME`` choice, or None for a file. (No file of
    ``upscale_models`` can be named so: ComfyUI lists only names with a model extension.)"""
    if model_name.startswith(EMBEDDED_PREFIX) and model_name[len(EMBEDDED_PREFIX):] in esc_arch.EMBEDDED_MODELS:
        return model_name[len(EMBEDDED_PREFIX):]
    return None


class _ComfyProgress:
    """Engine progress callback -> ComfyUI ProgressBar, checking for Cancel after every tile."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        bridge.check_interrupted()
        if self.bar is None:
            self.bar = bridge.progress_bar(max(total, 1))
        self.bar.update_absolute(done, max(total, 1))


def upscale_image(upscale_model: Any, image: torch.Tensor, *, outscale: float | None, tile_size: int, overlap: int,
                  precision: str, alpha_mode: str, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the engine on a ComfyUI IMAGE (+ optional MASK); returns ``(IMAGE, MASK)``.

    The IMAGE keeps its channel count (RGBA stays RGBA).  The MASK is the upscaled ``1 - alpha``
    (alpha from the image's 4th channel or from ``mask``), or all zeros when there is no alpha.
    """
    network = esc_network(upscale_model)
    rgb, alpha = _alpha_from_inputs(image, mask)  # refuses what is not RGB / RGBA before any memory is asked for
    device = bridge.torch_device()
    run_precision = _resolve_precision(precision, upscale_model, device)
    planes = join_alpha(rgb, alpha)
    tile: int | str = tile_size if tile_size > 0 else facts.DEFAULT_TILE

    bridge.check_interrupted()
    dtype = precision_policy.resolve_precision(run_precision, device)
    bridge.free_memory_for(memory.device_bytes(network, dtype, *image.shape[1:3], tile_size), device)

    def make_room() -> None:  # the engine's last resort: ComfyUI unloads every other model it holds here
        bridge.free_memory_for(1e30, device)
        bridge.empty_cache()

    def run() -> torch.Tensor:
        # The engine copies the network to the device/dtype it needs and leaves ours where it was
        # (ComfyUI's offload device), so nothing has to be moved back afterwards.  That copy must
        # not be made under ComfyUI's inference_mode (see LoadESCModel.load); the engine enters
        # inference mode itself for the actual computation.
        with torch.inference_mode(False):
            return esc_sr.upscale(network, planes, outscale=outscale, tile=tile, overlap=overlap, device=device,
                                  precision=run_precision, alpha=alpha_mode, progress=_ComfyProgress(),
                                  make_room=make_room)

    try:
        out = run()
    finally:
        bridge.empty_cache()

    color_planes, alpha_plane = split_alpha(out.clamp(0.0, 1.0))
    color = color_planes.movedim(1, -1)
    if alpha_plane is None:
        mask_out = torch.zeros(color.shape[:3], dtype=color.dtype, device=color.device)
        return color, mask_out
    alpha_out = alpha_plane.movedim(1, -1)
    mask_out = 1.0 - alpha_out[..., 0]
    image_out = torch.cat([color, alpha_out], -1) if image.shape[-1] == 4 else color
    return image_out, mask_out


# ------------------------------------------------------------------------------------------ nodes


class LoadESCModel:
    """Load an ESC checkpoint from ``models/upscale_models`` as an ``UPSCALE_MODEL``."""

    DESCRIPTION = ("Loads an ESC super-resolution checkpoint (.safetensors/.pth, any ESC variant incl. the "
                   "arbitrary-scale ESC-LTE). The output also works with the stock 'Upscale Image (using Model)'.")
    RETURN_TYPES = ("UPSCALE_MODEL",)
    RETURN_NAMES = ("upscale_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "A file in ComfyUI/models/upscale_models, or a model "
                                                        "embedded in esc-sr ('[embedded] default': ESC-tiny x4, "
                                                        "bicubic; '[embedded] real': ESCRealM-tiny x4, real-world "
                                                        "degradations, in training)."}),
            "attention": (ATTENTION_BACKENDS, {"default": "auto",
                                               "tooltip": "Window-attention kernel; auto keeps the model's default (sdpa)."}),
            "precision": (PRECISIONS, {"default": "auto",
                                       "tooltip": "Compute precision the ESC upscale nodes use when theirs is 'auto'."}),
        }}

    def load(self, model_name: str, attention: str = "auto", precision: str = "auto") -> tuple[Any]:
        embedded = embedded_model(model_name)
        path = embedded if embedded is not None else bridge.upscale_model_path(model_name)
        # ComfyUI executes every node inside torch.inference_mode(); weights created there would be
        # inference tensors, which cannot be copied or changed in place later.  Build a normal model.
        with torch.inference_mode(False):
            try:
                network = esc_arch.load_model(path)  # weights_only loading; CheckpointError names the file
            except esc_arch.CheckpointError:
                raise
            except Exception as exc:  # a reader failure esc_arch did not classify: still name the file
                raise esc_arch.CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
            if attention != "auto":
                esc_arch.set_attention_backend(network, attention)
            network.to(bridge.offload_device())
            descriptor = describe(network)
        setattr(descriptor, PRECISION_ATTRIBUTE, precision)
        bridge.attach_patcher(descriptor)
        return (descriptor,)


class UpscaleImageESC:
    """Tiled ESC upscaling with ComfyUI progress, Cancel and out-of-memory handling."""

    DESCRIPTION = ("Upscales an image with an ESC model in seamless tiles. output_scale 0 keeps the model's scale; "
                   "another value resizes the result (Lanczos). RGBA images and an optional MASK keep their alpha.")
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "upscale"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL",),
                "image": ("IMAGE",),
                "tile_size": _TILE_INPUT,
                "overlap": _OVERLAP_INPUT,
                "precision": _PRECISION_INPUT,
                "output_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_FACTOR, "step": 0.05,
                                           "tooltip": "Output size / input size; 0 = the model's own scale."}),
                "alpha_upscale": _ALPHA_INPUT,
            },
            "optional": {"mask": _MASK_INPUT},
        }

    def upscale(self, upscale_model: Any, image: torch.Tensor, tile_size: int = 0, overlap: int = facts.DEFAULT_OVERLAP,
                precision: str = facts.DEFAULT_PRECISION, output_scale: float = 0.0,
                alpha_upscale: str = facts.DEFAULT_ALPHA,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        network = esc_network(upscale_model)
        if network.arbitrary_scale and not output_scale:
            # The scale its spandrel descriptor declares (x4), as the stock upscale node would run it.
            output_scale = float(getattr(upscale_model, "scale", 4))
        return upscale_image(upscale_model, image, outscale=output_scale or None, tile_size=tile_size,
                             overlap=overlap, precision=precision, alpha_mode=alpha_upscale, mask=mask)


class UpscaleImageByFactorESC:
    """The arbitrary-scale ESC-LTE model at any real factor (2.5x, 3.2x, ...)."""

    DESCRIPTION = "Upscales by any factor with the arbitrary-scale ESC-LTE model (no resize step: the model renders it)."
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "upscale"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL",),
                "image": ("IMAGE",),
                "factor": ("FLOAT", {"default": 2.0, "min": 0.25, "max": MAX_FACTOR, "step": 0.05,
                                     "tooltip": "Output size / input size (rounded to whole pixels)."}),
                "tile_size": _TILE_INPUT,
                "overlap": _OVERLAP_INPUT,
                "precision": _PRECISION_INPUT,
                "alpha_upscale": _ALPHA_INPUT,
            },
            "optional": {"mask": _MASK_INPUT},
        }

    def upscale(self, upscale_model: Any, image: torch.Tensor, factor: float = 2.0, tile_size: int = 0,
                overlap: int = facts.DEFAULT_OVERLAP, precision: str = facts.DEFAULT_PRECISION,
                alpha_upscale: str = facts.DEFAULT_ALPHA,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        network = esc_network(upscale_model)
        if not network.arbitrary_scale:
            raise ValueError(f"'Upscale Image by Factor (ESC arbitrary-scale)' needs an ESC-LTE model, got a fixed "
                             f"x{network.scale} {network.arch_name}; use 'Upscale Image (ESC)' with output_scale")
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return upscale_image(upscale_model, image, outscale=float(factor), tile_size=tile_size, overlap=overlap,
                             precision=precision, alpha_mode=alpha_upscale, mask=mask)


NODE_CLASS_MAPPINGS = {
    "ESCModelLoader": LoadESCModel,
    "ESCUpscaleImage": UpscaleImageESC,
    "ESCUpscaleImageByFactor": UpscaleImageByFactorESC,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ESCModelLoader": "Load ESC Model",
    "ESCUpscaleImage": "Upscale Image (ESC)",
    "ESCUpscaleImageByFactor": "Upscale Image by Factor (ESC arbitrary-scale)",
}
