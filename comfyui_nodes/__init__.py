"""ComfyUI nodes for ESC super-resolution.

* "Load ESC Model" (``ESCModelLoader``): an ESC checkpoint from ``models/upscale_models``, or a model embedded in
  esc-sr, as an ``UPSCALE_MODEL`` (also usable by the stock "Upscale Image (using Model)").
* "Upscale Image (ESC)" (``ESCUpscaleImage``): tiled upscaling with progress, Cancel,
  out-of-memory fallback, a float output scale and alpha (RGBA IMAGE or IMAGE + MASK).
* "Upscale Image by Factor (ESC arbitrary-scale)" (``ESCUpscaleImageByFactor``): ESC-LTE at any factor.

Where the running ComfyUI has the V3 node schema (``comfy_api.latest``), this package exports only
``comfy_entrypoint`` (the V3 nodes, :mod:`comfyui_nodes.nodes_v3`); elsewhere (ComfyUI before August 2025, or
outside ComfyUI) it exports the V1 ``NODE_CLASS_MAPPINGS`` (:mod:`comfyui_nodes.nodes`). It never exports both:
ComfyUI would take the V1 mappings and never call the entry point. The choice is made once, at import.

Importing this package registers ESC with spandrel, so the stock "Load Upscale Model" node loads
ESC checkpoints too.  ComfyUI's other modules are imported only when a node runs (see ``comfy_bridge``).
"""

from .nodes import NODE_DISPLAY_NAME_MAPPINGS
from .spandrel_bridge import register as _register_esc_with_spandrel


def _has_v3_schema() -> bool:
    """Whether the running ComfyUI offers the V3 schema (``comfy_api.latest`` with ``io.ComfyNode``)."""
    try:
        from comfy_api.latest import ComfyExtension, io  # noqa: F401
    except Exception:  # not inside ComfyUI, or a ComfyUI from before the V3 schema
        return False
    return hasattr(io, "ComfyNode") and hasattr(io, "Schema") and hasattr(io, "NodeOutput")


NODE_API = "v3" if _has_v3_schema() else "v1"
"""Which node API this import chose: ``"v3"`` (``comfy_entrypoint``) or ``"v1"`` (``NODE_CLASS_MAPPINGS``)."""

_register_esc_with_spandrel()

if NODE_API == "v3":
    from .nodes_v3 import comfy_entrypoint

    __all__ = ["NODE_API", "comfy_entrypoint"]
else:
    from .nodes import NODE_CLASS_MAPPINGS

    __all__ = ["NODE_API", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
