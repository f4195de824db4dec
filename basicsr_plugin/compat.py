"""Let the *original* ``basicsr`` 1.4.2 from PyPI import, for users who already have it installed.

The ``train`` extra installs ``basicsr-volta`` (BasicSR's maintained master), but ``pip`` keeps an already installed
``basicsr`` 1.4.2 if that is what provides the package. Its ``basicsr/data/degradations.py`` imports
``torchvision.transforms.functional_tensor``, a module torchvision removed in 0.17 (its ``rgb_to_grayscale`` now lives
in ``torchvision.transforms.functional``). When - and only when - that module does not exist, it is registered as an
alias of ``torchvision.transforms.functional``; an installed module of that name is never replaced, and the maintained
forks do not import it at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

REMOVED_MODULE = "torchvision.transforms.functional_tensor"


def alias_removed_functional_tensor() -> bool:
    """Register the alias if torchvision lacks the module; returns True if it did."""
    if REMOVED_MODULE in sys.modules:
        return False
    try:
        if importlib.util.find_spec(REMOVED_MODULE) is not None:
            return False
    except ModuleNotFoundError:  # torchvision.transforms itself is missing: nothing to alias to
        return False
    sys.modules[REMOVED_MODULE] = importlib.import_module("torchvision.transforms.functional")
    return True
