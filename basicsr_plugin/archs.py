"""Register the esc_arch model classes into BasicSR's ARCH_REGISTRY under the official option-file names.

The classes are registered as they are (no wrapper, no copy): ``network_g: {type: ESC, dim: 64, ...}`` builds
``esc_arch.ESC(dim=64, ...)``, so checkpoints written by training are plain ``esc_arch`` state dicts.
"""

from __future__ import annotations

from basicsr.utils.registry import ARCH_REGISTRY

import esc_arch

def _register() -> None:
    # esc_arch.ARCHITECTURES: YAML ``type`` name (the official option files' class names) -> esc_arch class.
    for name, cls in esc_arch.ARCHITECTURES.items():
        if name in ARCH_REGISTRY:  # re-import (e.g. importlib.reload): the registry is process-global
            continue
        if cls.__name__ != name:
            raise RuntimeError(f"esc_arch class {cls.__name__} cannot be registered as {name!r}")
        ARCH_REGISTRY.register(cls)


_register()
