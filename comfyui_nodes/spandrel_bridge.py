"""ESC in spandrel, as ComfyUI sees it.

:func:`register` adds the ESC architectures to spandrel's global registry (idempotent; the
registration itself lives in :mod:`esc_arch.spandrel`), which is all ComfyUI's stock
"Load Upscale Model" needs to load ESC checkpoints.

:func:`describe` turns a network loaded by :func:`esc_arch.load_model` into the spandrel
``ImageModelDescriptor`` that ComfyUI passes around as ``UPSCALE_MODEL``, made by the same code as the stock
loader's (``esc_arch.spandrel.describe``), so both loaders produce equivalent objects; only the network is ours
(it honours checkpoint metadata and the attention backend).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def register() -> None:
    """Register ESC with spandrel's MAIN_REGISTRY (safe to call any number of times)."""
    from esc_sr.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()  # inside ComfyUI a no-op (it has imported spandrel); needed next to a CPU torch
    from esc_arch import spandrel as esc_spandrel
    from esc_sr import cards

    esc_spandrel.install()
    cards.attach_to_spandrel()  # descriptors of the embedded models carry their card (esc_model_card)


def describe(network: nn.Module) -> Any:
    """A spandrel ``ImageModelDescriptor`` wrapping ``network`` (any esc_arch image model), the same one the stock
    loader makes for its checkpoint. The arbitrary-scale ESC-LTE is described as a x4 model
    (``esc_arch.spandrel.LTE_SCALE``) whose call renders x4, so the stock upscale node can run it;
    "Upscale Image by Factor (ESC arbitrary-scale)" uses the network at any factor.
    """
    register()
    from esc_arch import spandrel as esc_spandrel

    return esc_spandrel.describe(network)
