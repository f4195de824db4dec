"""ComfyUI entry point: this repository is also a ComfyUI custom-node pack.

Clone or symlink the repository into ``ComfyUI/custom_nodes/``.  ComfyUI imports this file as a
package named after its path, so the node code (``comfyui_nodes``) and the model code
(``esc_arch``) are imported here as the ordinary top-level packages they are when
pip-installed, from this checkout (ahead of an older esc-sr that may be pip-installed in
ComfyUI's environment), and exist only once per process.  The checkout is on ``sys.path`` only
during that import, so its other folders (tests, scripts, ...) never shadow ComfyUI's modules.
Importing the pack also registers ESC with spandrel, so ComfyUI's stock "Load Upscale Model"
node loads ESC checkpoints from ``models/upscale_models``.
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

sys.path.insert(0, _REPO_ROOT)
try:
    import comfyui_nodes as _pack
finally:
    sys.path.remove(_REPO_ROOT)  # removes the entry inserted above (the first occurrence)

# The V3 entry point where this ComfyUI has the V3 schema, else the V1 mappings; never both (ComfyUI would use the
# V1 mappings and never call the entry point). comfyui_nodes chose at its import.
if _pack.NODE_API == "v3":
    comfy_entrypoint = _pack.comfy_entrypoint
    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
