"""ComfyUI nodes for ESC super-resolution.

* "Load ESC Model" (``ESCModelLoader``): an ESC checkpoint from ``models/upscale_models`` as an
  ``UPSCALE_MODEL`` (also usable by the stock "Upscale Image (using Model)").
* "Upscale Image (ESC)" (``ESCUpscaleImage``): tiled upscaling with progress, Cancel,
  out-of-memory fallback, a float output scale and alpha (RGBA IMAGE or IMAGE + MASK).
* "Upscale Image by Factor (ESC arbitrary-scale)" (``ESCUpscaleImageByFactor``): ESC-LTE at any factor.

Importing this package registers ESC with spandrel, so the stock "Load Upscale Model" node loads
ESC checkpoints too.  ComfyUI itself is imported only when a node runs (see ``comfy_bridge``).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .spandrel_bridge import register as _register_esc_with_spandrel

_register_esc_with_spandrel()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
