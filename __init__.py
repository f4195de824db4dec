"""ComfyUI entry point: this repository is also a ComfyUI custom-node pack.

Clone or symlink the repository into ``ComfyUI/custom_nodes/``.  ComfyUI imports this file
as a package named after its path, so the repository root is put on ``sys.path`` first:
the node code (``comfyui_nodes``) and the model code (``esc_arch``) then import as the
ordinary top-level packages they are when pip-installed, and exist only once per process.
Importing the pack also registers ESC with spandrel, so ComfyUI's stock "Load Upscale
Model" node loads ESC checkpoints from ``models/upscale_models``.
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
if _REPO_ROOT not in sys.path:
    # First, so this checkout wins over an older esc-sr that may be pip-installed in ComfyUI's environment.
    sys.path.insert(0, _REPO_ROOT)

from comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
