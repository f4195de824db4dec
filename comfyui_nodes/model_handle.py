"""What the "Load ESC Model" node hands downstream as ``UPSCALE_MODEL``.

ComfyUI's ``UPSCALE_MODEL`` is, by convention, a spandrel ``ImageModelDescriptor``: the stock
"Upscale Image (using Model)" node reads ``.model`` and ``.scale``, calls ``.to(device)`` and
calls the object on BCHW tiles.  The loader returns exactly that (see
:mod:`comfyui_nodes.spandrel_bridge`), so it is interchangeable with the stock loader; the
arbitrary-scale ESC-LTE is described as a x4 model there, as spandrel's ESC registration does.

Our own nodes accept a descriptor from either loader and take the ``esc_arch`` network out of
it with :func:`esc_network`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import esc_arch

# Attribute set on an UPSCALE_MODEL by "Load ESC Model": its compute-precision preference,
# used by our upscale nodes when their own precision is "auto".
PRECISION_ATTRIBUTE = "esc_precision"

def esc_network(upscale_model: Any) -> nn.Module:
    """The ``esc_arch`` network inside an ``UPSCALE_MODEL`` (ours or the stock loader's)."""
    network = getattr(upscale_model, "model", upscale_model)
    if not isinstance(network, esc_arch.ESCModelBase):
        described = getattr(getattr(upscale_model, "architecture", None), "name", None) or type(network).__name__
        raise TypeError(
            f"the ESC upscale nodes need an ESC model, got {described}; use ComfyUI's "
            "'Upscale Image (using Model)' for other architectures"
        )
    return network


def precision_preference(upscale_model: Any) -> str:
    """The loader's precision choice for this model, or "auto" for a stock-loaded one."""
    return str(getattr(upscale_model, PRECISION_ATTRIBUTE, "auto"))
