"""What is known about the published ESC models: the ones embedded in this package and the official release.

A model card here is the few facts a user looks for when picking a model (variant, scale, parameters, training
data, degradation, licence, where it comes from). ``esc-sr info`` prints them, the spandrel descriptors of the
embedded models carry them (``descriptor.esc_model_card``, once :func:`attach_to_spandrel`
has run, as the ComfyUI pack does), and the OpenModelDB entries in
``docs/openmodeldb/`` are written from them. The full cards of the embedded models are ``esc_arch/weights/*.md``.

* The embedded models are recognised by their weights (:func:`identify`: compared with the shipped files), so a copy under another name, loaded through spandrel, is still known.
* The official models (github.com/dslisleedh/ESC, release 1.0.0) are recognised by their release name (as
  ``esc-sr`` and ``esc_sr.hub`` name them, also as a file name such as ``ESC_light_X2.pth``); their weights are not
  shipped here, so there is nothing to compare.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["ModelCard", "EMBEDDED_CARDS", "OFFICIAL_FAMILIES", "card_for_name", "identify"]

OFFICIAL_REPOSITORY = "https://github.com/dslisleedh/ESC"
OFFICIAL_RELEASE = f"{OFFICIAL_REPOSITORY}/releases/download/1.0.0"


@dataclass(frozen=True)
class ModelCard:
    name: str
    """The name ``esc_arch.load_model`` / ``esc-sr -m`` takes (an embedded name or an official release name)."""
    variant: str
    """Architecture and preset, e.g. ``ESC (esc_tiny)``."""
    scale: int
    parameters: int | None
    """Values in the state dict; None where the weights are not shipped (``esc-sr info`` counts them)."""
    training_data: str
    degradation: str
    license: str
    """SPDX identifier of the weights' licence."""
    source: str
    """Where the weights come from."""
    card: str | None = None
    """The full model card (a path in this package), where there is one."""
    status: str | None = None
    """What a user must know before choosing it (e.g. still in training)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


EMBEDDED_CARDS: dict[str, ModelCard] = {
    "default": ModelCard(
        name="default",
        variant="ESC (esc_tiny: dim 32, 2 blocks x 5 conv blocks, window 16)",
        scale=4,
        parameters=120_508,
        training_data="BSDS200 + SunHays80 (280 photos; 260 trained on and 20 held out from the fourth session)",
        degradation="MATLAB-compatible bicubic x4 (BasicSR imresize), 8-bit",
        license="MIT",
        source="embedded in esc-sr: esc_arch/weights/esc_default_x4.safetensors (fp16, EMA weights, 52,900 iterations)",
        card="esc_arch/weights/README.md",
    ),
    "real": ModelCard(
        name="real",
        variant="ESCRealM (pixelshuffledirect head, esc_tiny size: dim 32, 2 blocks x 5 conv blocks, window 16)",
        scale=4,
        parameters=126_684,
        training_data="BSDS200 + SunHays80 (260 photos trained on, 20 held out)",
        degradation="Real-ESRGAN second-order degradations (blur, resize, noise, JPEG, twice), L1 loss, no GAN stage",
        license="MIT",
        source="embedded in esc-sr: esc_arch/weights/esc_real_x4.safetensors (fp16, EMA weights)",
        card="esc_arch/weights/esc_real_x4.md",
        status="in training: better than bicubic on JPEG inputs, not yet on its bars (see its card)",
    ),
}
"""The models embedded in this package, by their :data:`esc_arch.EMBEDDED_MODELS` name."""

_DFLIP = "DFLIP (DIV2K + Flickr2K + LSDIR + DiverSeg-IP)"
_BICUBIC = "bicubic (MATLAB imresize, BasicSR)"
_REAL = "Real-ESRGAN second-order degradations (RealESRGANDataset)"

OFFICIAL_FAMILIES: dict[str, tuple[str, str, str]] = {
    # release-name pattern -> (variant, training data, degradation); scales from the name
    r"ESC_DIV2K_X([234])": ("ESC (esc: dim 64, 5 blocks, window 32)", "DIV2K (800 images)", _BICUBIC),
    r"ESC_light_X([234])": ("ESC (esc_light)", "DIV2K (800 images)", _BICUBIC),
    r"ESC_FP_X([234])": ("ESCFP (esc_fp)", "DIV2K (800 images)", _BICUBIC),
    r"ESC_DFLIP_X([234])": ("ESC (esc: dim 64, 5 blocks, window 32)", _DFLIP, _BICUBIC),
    r"ESC_XL_DF2K_X([234])_FT": ("ESC (esc_xl), fine-tuned", "DF2K (DIV2K + Flickr2K)", _BICUBIC),
    r"ESC_Real_X(4)_MSE": ("ESCReal (esc_real), L1 stage", "DF2K + OST (DF2KMultiscaleOST)", _REAL),
    r"ESC_Real_X(4)_GAN": ("ESCReal (esc_real), GAN stage", "DF2K + OST (DF2KMultiscaleOST)", _REAL),
}
"""The official release (dslisleedh/ESC 1.0.0): MIT licensed, as the repository."""


def card_for_name(name: str | os.PathLike) -> ModelCard | None:
    """The card of an embedded name (``'real'``) or an official release name (``'ESC_DIV2K_X4'``, also as a file
    name or path, ``.../ESC_light_X2.pth``), or None."""
    text = str(name)
    if text in EMBEDDED_CARDS:
        return EMBEDDED_CARDS[text]
    stem = re.sub(r"\.(pth|pt|ckpt|safetensors)$", "", Path(text).name, flags=re.IGNORECASE)
    for pattern, (variant, data, degradation) in OFFICIAL_FAMILIES.items():
        match = re.fullmatch(pattern, stem, flags=re.IGNORECASE)
        if match:
            canonical = pattern.replace(r"([234])", match.group(1)).replace("(4)", "4")
            return ModelCard(
                name=canonical, variant=variant, scale=int(match.group(1)), parameters=None, training_data=data,
                degradation=degradation, license="MIT", source=f"{OFFICIAL_RELEASE}/{canonical}.pth",
                card=OFFICIAL_REPOSITORY,
            )
    return None


_EMBEDDED_STATES: dict[str, tuple[tuple[int, int], dict[str, torch.Tensor]]] = {}


def _embedded_state(name: str, path: Path) -> dict[str, torch.Tensor] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _EMBEDDED_STATES.get(name)
    if cached is None or cached[0] != key:
        from safetensors.torch import load_file

        cached = (key, load_file(str(path)))
        _EMBEDDED_STATES[name] = cached
    return cached[1]


def _same_weights(state: Mapping[str, Any], shipped: Mapping[str, torch.Tensor]) -> bool:
    if set(state) != set(shipped):
        return False
    if any(not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in shipped.items()):
        return False
    # The shipped files are fp16; a model loaded from them holds the same values in fp32 (exactly representable).
    return all(torch.equal(state[k].detach().to("cpu", v.dtype), v) for k, v in shipped.items())


def identify(state_dict: Mapping[str, Any]) -> ModelCard | None:
    """The card of the embedded model whose weights these are (any float dtype, as stored or cast), or None.
    Cheap for every other model: the key sets differ, or the shapes do, before any value is compared."""
    from esc_arch import EMBEDDED_MODELS

    for name, path in EMBEDDED_MODELS.items():
        if name not in EMBEDDED_CARDS:
            continue
        shipped = _embedded_state(name, path)
        if shipped is not None and _same_weights(state_dict, shipped):
            return EMBEDDED_CARDS[name]
    return None


def attach_to_spandrel() -> None:
    """Make esc_arch's spandrel descriptors carry the card of an embedded model (``descriptor.esc_model_card``;
    None for other models). Imports ``esc_arch.spandrel``, hence spandrel; the ComfyUI pack calls it."""
    from esc_arch import spandrel as esc_spandrel

    esc_spandrel.MODEL_CARD = identify
