"""Make ``import torchvision`` work when its compiled ops cannot load next to the installed torch.

Why this exists
---------------
PyPI's torchvision wheels are CUDA builds. Installed next to a CPU-only torch, torchvision's ``_C`` extension
cannot load (it links ``libtorch_cuda.so``). torchvision guards most of its fake-tensor registrations with
``_has_ops()``, but not the two for ``torchvision::nms`` and ``torchvision::qnms``, so the import dies with::

    RuntimeError: operator torchvision::nms does not exist

and with it every package that imports torchvision (basicsr, spandrel).

What it does
------------
:func:`ensure_torchvision_importable` imports torchvision. Only if that import fails with exactly the error above,
it declares the two missing operator *schemas* (no kernels: calling ``torchvision.ops.nms`` still raises
torchvision's own "Couldn't load custom C++ ops" error), forgets the half-imported torchvision modules and imports
again. Everything else in torchvision that BasicSR and spandrel use (transforms, models, utils) is pure Python.
Where torchvision imports cleanly (a matching CPU or CUDA build) it does nothing at all; any other import error is
re-raised unchanged.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

#: The one failure this module repairs (the message of torchvision's RuntimeError).
MISSING_NMS_MESSAGE = "operator torchvision::nms does not exist"

# Schemas of the two operators that torchvision registers fake kernels for without checking that they exist.
_MISSING_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor output_scale, int output_zero_point) -> Tensor",
)

# The torch.library.Library object must stay alive: when it is garbage-collected its definitions are removed.
_schema_library = None
_lock = threading.Lock()

#: True once the shim had to declare the schemas in this process (for diagnostics and tests).
applied = False


def _forget_partial_import() -> None:
    """Drop the modules a failed ``import torchvision`` left behind so the next import starts clean."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _declare_missing_schemas() -> None:
    global _schema_library, applied
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_OPERATOR_SCHEMAS:
        library.define(schema)
    _schema_library = library
    applied = True


def ensure_torchvision_importable() -> ModuleType:
    """Import torchvision, repairing only the "operator torchvision::nms does not exist" failure.

    Call this before anything imports basicsr or spandrel. It is idempotent and thread-safe.

    Returns:
        The imported ``torchvision`` module.

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: torchvision failed to import for any other reason (re-raised unchanged).
    """
    with _lock:
        module = sys.modules.get("torchvision")
        if module is not None and hasattr(module, "transforms"):
            return module
        try:
            import torchvision
        except RuntimeError as error:
            if MISSING_NMS_MESSAGE not in str(error):
                raise
            _forget_partial_import()
            _declare_missing_schemas()
            import torchvision
        return torchvision
