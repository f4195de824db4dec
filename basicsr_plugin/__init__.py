"""BasicSR plugin for ESC: registers the ESC architectures, datasets and models into BasicSR's registries.

Importing this package

1. makes ``import torchvision`` work on CPU-only installs (:mod:`esc_sr.torchvision_shim`) and, for the
   original ``basicsr`` 1.4.2, provides the torchvision module it imports that no longer exists
   (:mod:`basicsr_plugin.compat`),
2. registers the archs ``ESC``, ``ESCFP``, ``ESCReal``, ``ESCRealM``, ``ESCLTE`` (the classes live in
   :mod:`esc_arch`; nothing is copied), the datasets and the models,
3. applies the narrow CPU / multi-process fixes to BasicSR (:mod:`basicsr_plugin.patches`).

Then BasicSR's own pipelines do the rest: see :mod:`basicsr_plugin.entry` (``esc-train`` / ``esc-test``).
"""

from esc_sr.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()

from basicsr_plugin.compat import alias_removed_functional_tensor  # noqa: E402

alias_removed_functional_tensor()

from basicsr_plugin import archs, data, models, patches  # noqa: E402  (registration side effects)

patches.apply()

__all__ = ["archs", "data", "models", "patches"]
