"""Small, documented compatibility fixes for third-party packages (not part of the model code).

Only :mod:`esc_arch.compat.torchvision_shim` lives here; see its docstring for when it acts.
"""

from esc_arch.compat.torchvision_shim import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable"]
