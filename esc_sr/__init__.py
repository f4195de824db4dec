"""esc-sr, the application around the ESC architecture (:mod:`esc_arch`).

``esc_arch`` is the model definition (torch + safetensors + numpy); this package is what runs it for people:

* :mod:`esc_sr.engine`  -- :func:`upscale`: tiled, memory-bounded inference on tensors, numpy arrays and PIL images;
* :mod:`esc_sr.images`  -- image files in and out (bit depths, alpha, EXIF);
* :mod:`esc_sr.atomic`  -- the one atomic writer; :mod:`esc_sr.checkpoints` -- :func:`save_model` (safetensors);
* :mod:`esc_sr.hub`     -- the official weights, downloaded once into a cache;
* :mod:`esc_sr.demo`, :mod:`esc_sr.onnx_export`, :mod:`esc_sr.chainner_hook` (with :mod:`esc_sr.distribution`,
  a wheel of the running esc-sr), :mod:`esc_sr.cli` (``esc-sr``).

Imports go one way: ``esc_sr`` uses ``esc_arch``, never the reverse.

``__version__``, ``upscale`` and ``save_model`` are loaded on first access, so importing a submodule that needs no
torch (``esc_sr.cli`` for ``esc-sr --help``) does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esc_arch import __version__

    from .checkpoints import save_model
    from .engine import upscale

__all__ = ["__version__", "save_model", "upscale"]


def __getattr__(name: str) -> Any:  # PEP 562
    if name == "__version__":
        from esc_arch import __version__

        return __version__
    if name == "upscale":
        from .engine import upscale

        return upscale
    if name == "save_model":
        from .checkpoints import save_model

        return save_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
