"""Writing checkpoints: :func:`save_model`, the ``.safetensors`` files ``esc-sr convert`` writes.

Reading stays in :mod:`esc_arch.checkpoint` (``load_model`` is what every host shares); writing is the
application's, through its one atomic writer (:mod:`esc_sr.atomic`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esc_arch import ESCModelBase, __version__
from esc_arch.checkpoint import METADATA_KEY

from .atomic import atomic_write


def save_model(
    model: ESCModelBase, path: str | os.PathLike[str], *, half: bool = False,
    description: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to a ``.safetensors`` file with metadata (architecture, hyperparameters,
    scale, package version) that :func:`esc_arch.load_model` reads back.  The write is atomic.

    ``half=True`` stores floating-point tensors as fp16. ``description`` (JSON-serialisable: training recipe,
    measured quality, ...) is stored in the metadata as it is; ``esc_arch.checkpoint.read_checkpoint`` returns it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: save_model writes .safetensors files")
    tensors = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors[key] = tensor.contiguous().clone()
    metadata = {
        "arch": model.arch_name,
        "hyperparameters": model.hyperparameters,
        "scale": model.scale,
        "esc_sr_version": __version__,
    }
    if description is not None:
        metadata["description"] = dict(description)
    with atomic_write(path) as temp:
        save_file(tensors, temp, metadata={METADATA_KEY: json.dumps(metadata), "format": "pt"})
    return path
