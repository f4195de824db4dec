"""Spandrel architectures for the ESC family, so `spandrel.ModelLoader` (and every tool built on it:
chaiNNer, ComfyUI, OpenModelDB's metadata script ...) detects and loads ESC checkpoints.

One `Architecture` per ESC model class, with the class's name as its id, as spandrel does:

=========  ==========================================================================
id         checkpoints
=========  ==========================================================================
ESC        official ESC / ESC-light / ESC-XL, neosr ``esc(realsr=False)``, ours
ESCFP      official ESC-FP, neosr ``esc_fp``
ESCReal    official ESC-Real (nearest+conv and DySample heads), neosr ``esc`` (realsr)
ESCRealM   official ESCRealM, traiNNer-redux ``escrealm``
ESCLTE     arbitrary-scale ESC (esc_arb LTE); loaded as a x4 model (see `ESCLTEArch`)
=========  ==========================================================================

Detection and hyperparameters come from `esc_arch.detection.VARIANTS`, the table
`esc_arch.load_model` uses too (one architecture per row, in the table's order).  Nothing is
registered on import: call `install()`::

    import spandrel, esc_arch.spandrel
    esc_arch.spandrel.install()
    model = spandrel.ModelLoader().load_from_file("4x_ESC.pth")

`install()` adds only these architectures.  It never installs `spandrel_extra_arches`: chaiNNer
adds those itself with ``MAIN_REGISTRY.add(*EXTRA_REGISTRY)`` (no ``ignore_duplicates``), which
would fail if anybody had added them before.  (Where ``import spandrel`` itself fails next to a CPU-only
torch, ``esc_sr.torchvision_shim.ensure_torchvision_importable()`` before it repairs torchvision's import.)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from spandrel import (
    MAIN_REGISTRY,
    ArchRegistry,
    ArchSupport,
    Architecture,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from typing_extensions import override

from ..base import ESCModelBase
from ..checkpoint import build_model, canonicalize_state_dict, check_state_dict
from ..detection import VARIANTS, Variant, infer_architecture
from ..errors import CheckpointError
from ..presets import match_preset

__all__ = ["ESCArchitecture", "ESC_REGISTRY", "LTE_SCALE", "describe", "install"]

MODEL_CARD: Callable[[StateDict], Any] | None = None  # state dict -> card of a published model (esc_sr.cards)
LTE_SCALE = 4
"""The integer scale an arbitrary-scale model is exposed with: the top of its training range (x1-x4).
Spandrel descriptors have one fixed scale; for other factors call ``descriptor.model.upscale_by(image, factor)``."""

_PRESET_TAGS = {"esc_light": "light", "esc_xl": "XL", "esc_tiny": "tiny"}
_UPSAMPLER_TAGS = {"dysample": "DySample", "nearest+conv-neosr": "nearest+conv(neosr)"}


def _canonical(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The state dict as esc_arch reads it (esc_arb's ``{'args', 'sd'}`` payload unwrapped), or None."""
    try:
        return canonicalize_state_dict(state_dict)
    except CheckpointError:
        return None


def _tags(model: ESCModelBase) -> list[str]:
    hp = model.hyperparameters
    tags = [_PRESET_TAGS[p]] if (p := match_preset(model)) in _PRESET_TAGS else []
    tags += [f"{hp['dim']}dim", f"{hp['n_blocks']}nb", f"{hp['window_size']}w"]
    if hp.get("use_ln"):
        tags.append("LayerNorm")
    if "upsampler" in hp:
        tags.append(_UPSAMPLER_TAGS.get(hp["upsampler"], hp["upsampler"]))
    if getattr(model, "unshuffle", 1) > 1:
        tags.append(f"{model.unshuffle}unshuffle")
    if model.arbitrary_scale:
        tags += ["LTE", "arbitrary-scale"]
    return tags


class ESCArchitecture(Architecture[ESCModelBase]):
    """The spandrel architecture of one row of esc_arch's detection table (its id: the class name)."""

    def __init__(self, variant: Variant) -> None:
        def detect(state_dict: StateDict) -> bool:
            state = _canonical(state_dict)
            return state is not None and variant.matches(state)

        super().__init__(id=variant.name, detect=detect)
        self.variant = variant

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESCModelBase]:
        state = _canonical(state_dict)
        if state is None:
            raise ValueError(f"not a state dict of {self.variant.name}")
        check_state_dict(state)  # sizes, strides, finiteness: before anything is built (as esc_arch.load_model)
        cls, kwargs = infer_architecture(state)
        if cls is not self.variant.cls:
            raise ValueError(f"state dict was detected as {self.variant.name} but its tensors describe {cls.arch_name}")
        return describe(build_model(cls, kwargs, state), state, architecture=self)


def describe(
    model: ESCModelBase, state_dict: StateDict | None = None, *, architecture: ESCArchitecture | None = None
) -> ImageModelDescriptor[ESCModelBase]:
    """The spandrel descriptor of an ESC model (what ``spandrel.ModelLoader`` returns for its checkpoint).

    ``state_dict`` is loaded into ``model`` (spandrel's descriptors do that); by default, the model's own weights.
    """
    if architecture is None:
        architecture = next(s.architecture for s in ESC_REGISTRY if s.architecture.id == model.arch_name)
    scale = LTE_SCALE if model.arbitrary_scale else model.scale
    if scale < 1 or scale != int(scale):
        raise ValueError(
            f"{model.arch_name} with these hyperparameters changes the image size by {scale:g}x; "
            "spandrel can only describe models with an integer scale >= 1"
        )
    descriptor = ImageModelDescriptor(
        model,
        model.state_dict() if state_dict is None else state_dict,
        architecture=architecture,
        purpose="Restoration" if scale == 1 else "SR",
        tags=_tags(model),
        supports_half=model.supports_half,
        supports_bfloat16=model.supports_half,
        scale=int(scale),
        input_channels=3,
        output_channels=3,
        # Any size >= 1x1 works (the model pads internally), but padding the *image* to the window by reflection
        # is the official evaluation protocol and what esc_sr.upscale does, so spandrel hosts (chaiNNer,
        # ComfyUI's stock nodes) give the same pixels at the borders. The arbitrary-scale model is evaluated
        # unpadded upstream: its encoder pads internally.
        size_requirements=SizeRequirements(multiple_of=1 if model.arbitrary_scale else model.window_size),
        # Window attention and large kernels are local: tiles only lose context at their borders.
        tiling=ModelTiling.SUPPORTED,
        call_fn=_render_at_lte_scale if model.arbitrary_scale else None,
    )
    descriptor.esc_model_card = MODEL_CARD(descriptor.model.state_dict()) if MODEL_CARD else None  # type: ignore
    return descriptor


def _render_at_lte_scale(model: ESCModelBase, image: torch.Tensor) -> torch.Tensor:
    return model.upscale_by(image, LTE_SCALE)  # type: ignore


ESC_REGISTRY = ArchRegistry()
"""The ESC architectures, in the detection table's order."""
ESC_REGISTRY.add(*(ArchSupport.from_architecture(ESCArchitecture(v)) for v in VARIANTS))


def install(registry: ArchRegistry = MAIN_REGISTRY) -> list[ArchSupport]:
    """Add the ESC architectures to ``registry`` (spandrel's `MAIN_REGISTRY` by default).

    Idempotent: architectures already present (by id) are kept, and the ones added are returned,
    so a second call returns ``[]``.  Only ESC ids are added, never spandrel_extra_arches.
    """
    return registry.add(*ESC_REGISTRY, ignore_duplicates=True)
