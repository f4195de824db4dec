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

Detection uses spandrel's `KeyCondition`s; every hyperparameter is read from tensor shapes by
`esc_arch.infer_architecture` (the rules live there, once).  Nothing is registered on import:
call `install()`::

    import spandrel, esc_arch.spandrel
    esc_arch.spandrel.install()
    model = spandrel.ModelLoader().load_from_file("4x_ESC.pth")

`install()` adds only these architectures.  It never installs `spandrel_extra_arches`: chaiNNer
adds those itself with ``MAIN_REGISTRY.add(*EXTRA_REGISTRY)`` (no ``ignore_duplicates``), which
would fail if anybody had added them before.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch

from .._compat import ensure_torchvision_importable

# spandrel imports torchvision, which fails next to a CPU-only torch without this (see the shim).
ensure_torchvision_importable()

from spandrel import (  # noqa: E402
    MAIN_REGISTRY,
    ArchRegistry,
    ArchSupport,
    Architecture,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from spandrel.util import KeyCondition  # noqa: E402
from typing_extensions import override  # noqa: E402

from .. import ESC, ESCFP, ESCLTE, ESCReal, ESCRealM, PRESETS, infer_architecture  # noqa: E402
from ..base import ESCModelBase  # noqa: E402

__all__ = [
    "ESCArch",
    "ESCFPArch",
    "ESCRealArch",
    "ESCRealMArch",
    "ESCLTEArch",
    "ESC_REGISTRY",
    "LTE_SCALE",
    "install",
]

# supports_half / supports_bfloat16 are measured, not assumed: tests/test_spandrel_dtypes.py runs
# every golden checkpoint in fp16 and bf16 and compares with fp32 (numbers: docs/spandrel_chainner.md).
# The trunk and the convolutional heads hold up in both, and so does DySample, which computes its
# sampling positions in fp32 whatever the model's dtype.  The LTE decoder does not (fp16 max error
# 0.35, bf16 0.83 on the golden case): its coordinates and areas need fp32.
_LOW_PRECISION_UNSAFE_UPSAMPLERS: frozenset[str] = frozenset()


def _pad_multiple(model: torch.nn.Module) -> int:
    if isinstance(model, ESCLTE):
        return 1
    return model.window_size  # as BasicSR's ESRModel.test pads (network_g.window_size)


LTE_SCALE = 4
"""The integer scale the arbitrary-scale ESCLTE is exposed with: the top of its training range
(x1-x4).  Spandrel descriptors have one fixed scale; for other factors call
``descriptor.model.upscale_by(image, factor)``."""

# Keys every ESC trunk has (window attention, conv stage, final conv), relative to the trunk.
_TRUNK_KEYS = (
    "blocks.0.ln_proj.weight",
    "blocks.0.proj.proj.weight",
    "blocks.0.ln_attn.weight",
    "blocks.0.attn.relative_position_bias",
    "blocks.0.attn.to_qkv.weight",
    "blocks.0.attn.to_out.weight",
    "blocks.0.pconvs.0.aggr.weight",
    "blocks.0.convffns.0.proj.weight",
    "blocks.0.ln_out.weight",
    "blocks.0.conv_out.weight",
    "last.weight",
)


def _trunk(prefix: str = "") -> tuple[str, ...]:
    return tuple(prefix + key for key in _TRUNK_KEYS)


def _build(state_dict: StateDict, expected: type[ESCModelBase]) -> ESCModelBase:
    """The model `esc_arch.infer_architecture` reads from the tensor shapes (not yet loaded)."""
    cls, kwargs = infer_architecture(state_dict)
    if cls is not expected:
        raise ValueError(f"state dict was detected as {expected.arch_name} but its tensors describe {cls.arch_name}")
    return cls(**kwargs)


@functools.lru_cache(maxsize=None)
def _preset_hyperparameters(name: str) -> dict[str, Any]:
    """Hyperparameters of a named preset (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = PRESETS[name]()
    return dict(model.hyperparameters)


def _preset_tag(model: ESCModelBase, presets: Mapping[str, str]) -> list[str]:
    """``[tag]`` when the model is one of the paper's named configurations (at any scale)."""
    ignored = ("upscaling_factor", "attn_type")
    mine = {k: v for k, v in model.hyperparameters.items() if k not in ignored}
    for preset, tag in presets.items():
        theirs = {k: v for k, v in _preset_hyperparameters(preset).items() if k not in ignored}
        if mine == theirs:
            return [tag]
    return []


def _size_tags(model: ESCModelBase) -> list[str]:
    hp = model.hyperparameters
    return [f"{hp['dim']}dim", f"{hp['n_blocks']}nb", f"{hp['window_size']}w"]


_UPSAMPLER_TAGS = {
    "dysample": "DySample",
    "nearest+conv": "nearest+conv",
    "nearest+conv-neosr": "nearest+conv(neosr)",
    "conv": "conv",
    "pixelshuffle": "pixelshuffle",
    "pixelshuffledirect": "pixelshuffledirect",
    "transpose+conv": "transpose+conv",
}


def _descriptor(
    arch: Architecture[Any],
    model: ESCModelBase,
    state_dict: StateDict,
    tags: list[str],
    *,
    scale: int | None = None,
    low_precision: bool = True,
    call_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> ImageModelDescriptor[Any]:
    scale = model.scale if scale is None else scale
    if scale < 1 or scale != int(scale):
        raise ValueError(
            f"{model.arch_name} with these hyperparameters changes the image size by {scale:g}x; "
            "spandrel can only describe models with an integer scale >= 1"
        )
    scale = int(scale)
    return ImageModelDescriptor(
        model,
        state_dict,
        architecture=arch,
        purpose="Restoration" if scale == 1 else "SR",
        tags=tags,
        supports_half=low_precision,
        supports_bfloat16=low_precision,
        scale=scale,
        input_channels=3,
        output_channels=3,
        # Any size >= 1x1 works (the model pads internally), but padding the *image* to the window
        # by reflection is the official evaluation protocol and what esc_sr.upscale does, so
        # spandrel hosts (chaiNNer, ComfyUI's stock nodes) give the same pixels at the borders.
        # (The arbitrary-scale model is evaluated unpadded upstream: its encoder pads internally.)
        size_requirements=SizeRequirements(multiple_of=_pad_multiple(model)),
        # Window attention and large kernels are local: tiles only lose context at their borders.
        tiling=ModelTiling.SUPPORTED,
        call_fn=call_fn,
    )


class ESCArch(Architecture[ESC]):
    """Classic ESC (base, light, XL) with its single-conv pixel-shuffle head."""

    def __init__(self) -> None:
        super().__init__(
            id="ESC",
            detect=KeyCondition.has_all(
                "plk_filter",
                "proj.weight",
                *_trunk(),
                "blocks.0.pconvs.0.plk.dwc_proj.1.weight",
                "blocks.0.pconvs.0.plk.dwc_proj.3.weight",
                "to_img.weight",
            ),
        )

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESC]:
        model = _build(state_dict, ESC)
        tags = _preset_tag(model, {"esc_light": "light", "esc_xl": "XL", "esc_tiny": "tiny"})
        tags += _size_tags(model)
        if model.hyperparameters["use_ln"]:
            tags.append("LayerNorm")
        return _descriptor(self, model, state_dict, tags)


class ESCFPArch(Architecture[ESCFP]):
    """ESC-FP: decomposed large kernel (``lk_channel`` + ``lk_spatial``), bicubic residual."""

    def __init__(self) -> None:
        super().__init__(
            id="ESCFP",
            detect=KeyCondition.has_all(
                "lk_channel",
                "lk_spatial",
                "proj.weight",
                *_trunk(),
                "blocks.0.pconvs.0.plk.proj.1.weight",
                "blocks.0.pconvs.0.plk.proj.3.weight",
                "ln_last.weight",
                "to_img.weight",
            ),
        )

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESCFP]:
        model = _build(state_dict, ESCFP)
        return _descriptor(self, model, state_dict, _size_tags(model))


class ESCRealArch(Architecture[ESCReal]):
    """ESC-Real: input skip branch, LayerNorms, and one of three heads (official nearest+conv,
    DySample, or neosr's nearest+conv layout)."""

    def __init__(self) -> None:
        super().__init__(
            id="ESCReal",
            detect=KeyCondition.has_all(
                "plk_filter",
                "proj.weight",
                *_trunk(),
                "blocks.0.lns.0.weight",
                "skip.0.weight",
                "skip.1.weight",
                "skip.3.weight",
                KeyCondition.has_any(
                    # official nearest+conv: to_img.{1,4,6,8}
                    KeyCondition.has_all("to_img.1.weight", "to_img.4.weight", "to_img.6.weight", "to_img.8.weight"),
                    # DySample (official use_dysample, neosr default)
                    KeyCondition.has_all("to_img.init_pos", "to_img.offset.weight", "to_img.end_conv.weight"),
                    # neosr nearest+conv: to_img.{1,3,5} (x2) or to_img.{1,3,6,8,10} (x4)
                    KeyCondition.has_all("to_img.1.weight", "to_img.3.weight"),
                ),
            ),
        )

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESCReal]:
        model = _build(state_dict, ESCReal)
        upsampler = model.hyperparameters["upsampler"]
        tags = _size_tags(model) + [_UPSAMPLER_TAGS[upsampler]]
        return _descriptor(
            self, model, state_dict, tags, low_precision=upsampler not in _LOW_PRECISION_UNSAFE_UPSAMPLERS
        )


class ESCRealMArch(Architecture[ESCRealM]):
    """ESCRealM (official, traiNNer-redux ``escrealm``): selectable ``UniUpsample`` head, x1-x4."""

    def __init__(self) -> None:
        super().__init__(
            id="ESCRealM",
            detect=KeyCondition.has_all(
                "plk_filter",
                KeyCondition.has_any("proj.weight", "proj.1.weight"),
                *_trunk(),
                "blocks.0.lns.0.weight",
                "to_img.MetaUpsample",
            ),
        )

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESCRealM]:
        model = _build(state_dict, ESCRealM)
        hp = model.hyperparameters
        tags = _size_tags(model) + [_UPSAMPLER_TAGS.get(hp["upsampler"], hp["upsampler"])]
        if model.unshuffle > 1:
            tags.append(f"{model.unshuffle}unshuffle")
        return _descriptor(
            self, model, state_dict, tags, low_precision=hp["upsampler"] not in _LOW_PRECISION_UNSAFE_UPSAMPLERS
        )


def _esc_arb_payload(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """esc_arb (LIIF/LTE training script) files hold ``{'model': {'name', 'args', 'sd'}}``.

    Spandrel unwraps ``model`` but not ``sd``; do that here so such files load unchanged.
    """
    inner = state_dict.get("sd")
    if isinstance(inner, Mapping) and "args" in state_dict:
        return inner
    return state_dict


_LTE_KEYS = KeyCondition.has_all(
    "encoder.plk_filter",
    "encoder.proj.weight",
    *_trunk("encoder."),
    "coef.weight",
    "freq.weight",
    "phase.weight",
    "imnet.layers.0.weight",
)


class ESCLTEArch(Architecture[ESCLTE]):
    """Arbitrary-scale ESC (ESC encoder + LTE decoder).

    A spandrel descriptor has one integer scale, so the model is exposed as x`LTE_SCALE`; the
    module itself (``descriptor.model.upscale_by(image, factor)``) renders any real factor.
    """

    def __init__(self) -> None:
        super().__init__(id="ESCLTE", detect=lambda state_dict: _LTE_KEYS(_esc_arb_payload(state_dict)))

    @override
    def load(self, state_dict: StateDict) -> ImageModelDescriptor[ESCLTE]:
        state_dict = dict(_esc_arb_payload(state_dict))
        model = _build(state_dict, ESCLTE)
        tags = _size_tags(model) + ["LTE", "arbitrary-scale"]
        return _descriptor(
            self, model, state_dict, tags, scale=LTE_SCALE, low_precision=False,
            call_fn=lambda module, image: module.upscale_by(image, LTE_SCALE),
        )


ESC_REGISTRY = ArchRegistry()
"""The ESC architectures, in detection order (ESCRealM is tried before ESCReal: both have the
real-world trunk and input skip branch; only ESCRealM has ``to_img.MetaUpsample``)."""

ESC_REGISTRY.add(
    ArchSupport.from_architecture(ESCArch()),
    ArchSupport.from_architecture(ESCFPArch()),
    ArchSupport.from_architecture(ESCRealMArch(), before=("ESCReal",)),
    ArchSupport.from_architecture(ESCRealArch()),
    ArchSupport.from_architecture(ESCLTEArch()),
)

def install(registry: ArchRegistry = MAIN_REGISTRY) -> list[ArchSupport]:
    """Add the ESC architectures to ``registry`` (spandrel's `MAIN_REGISTRY` by default).

    Idempotent: architectures already present (by id) are kept, and the ones added are returned,
    so a second call returns ``[]``.  Only ESC ids are added, never spandrel_extra_arches.
    """
    return registry.add(*ESC_REGISTRY, ignore_duplicates=True)
