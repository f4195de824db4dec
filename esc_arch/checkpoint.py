"""Checkpoint I/O: read any ESC checkpoint safely, infer its architecture from the tensors alone,
and write safetensors with metadata.

Supported layouts: BasicSR (``params_ema`` / ``params``), neosr, traiNNer-redux (bare safetensors
or ``{'metadata', params}``), esc_arb/LTE (``{'model': {'sd': ...}}``), plain state dicts, and
the files :func:`save_model` writes.  Pickles are read with ``torch.load(weights_only=True)``, so a
checkpoint can never run code while loading.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .atomic import atomic_write
from .base import ESCModelBase
from .detection import infer_architecture
from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

_WRAPPER_KEYS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net", "sd")
_PREFIXES = ("module.", "netG.", "_orig_mod.")
_METADATA_KEY = "esc_sr"
DEFAULT_MODEL_FILE = Path(__file__).with_name("weights") / "esc_default_x4.safetensors"


# -- reading ------------------------------------------------------------------------------------
def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"


def _read_file(path: Path) -> tuple[Any, dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes)")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused by the safe (weights-only) loader: {detail or _first_line(e)[:120]}; "
            "the file is corrupt or asks to run code, and was not executed"
        ) from None
    except Exception as e:  # torch's unpickler raises anything from EOFError to IndexError on garbage
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)[:160]})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def canonicalize_state_dict(obj: Any, source: Any = None) -> StateDict:
    """Unwrap training wrappers (``params_ema`` preferred) and strip ``module.``/``netG.``/``_orig_mod.``."""
    name = _describe(source)
    for _ in range(4):
        if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors if tensors else obj
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: not a state dict (the file holds a {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{name}: not a state dict (no tensors; top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a checkpoint file: (canonical state dict, ESC-SR metadata or {})."""
    path = Path(path)
    raw, file_metadata = _read_file(path)
    metadata: dict[str, Any] = {}
    if _METADATA_KEY in file_metadata:
        try:
            metadata = json.loads(file_metadata[_METADATA_KEY])
        except json.JSONDecodeError:
            metadata = {}
    return canonicalize_state_dict(raw, path), metadata


def read_state_dict(path: PathLike) -> StateDict:
    """The canonical state dict of a checkpoint file (wrappers unwrapped, prefixes stripped)."""
    return read_checkpoint(path)[0]


# -- loading and saving -------------------------------------------------------------------------
def load_model(source: PathLike | Mapping[str, Any], **overrides: Any) -> ESCModelBase:
    """Build and load an ESC model from a checkpoint path, a state dict, or ``'default'``.

    The variant and every hyperparameter come from the tensors (and from the metadata of files
    written by :func:`save_model`).  ``overrides`` replace inferred keyword arguments, e.g.
    ``attn_type='naive'``, or ``upscaling_factor=4`` to load an x2 ESC checkpoint into an x4
    model (its sub-pixel head is resized as upstream does).  The model is returned in eval mode.

    Raises :class:`CheckpointError` with a one-line reason naming the file.
    """
    if isinstance(source, str) and source == "default":
        if not DEFAULT_MODEL_FILE.exists():
            raise CheckpointError(f"{DEFAULT_MODEL_FILE}: the embedded default model is missing from this installation")
        source = DEFAULT_MODEL_FILE
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        state, metadata = read_checkpoint(source)
    else:
        state, metadata = canonicalize_state_dict(source, None), {}
    try:
        cls, kwargs = infer_architecture(state)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if metadata.get("arch") == cls.arch_name:
        for key, value in metadata.get("hyperparameters", {}).items():
            kwargs.setdefault(key, value)
    kwargs.update(overrides)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot build {cls.arch_name}({_kwargs_text(kwargs)}): {e}") from None
    _load_strict(model, state, name)
    return model.eval()


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _load_strict(model: nn.Module, state: StateDict, name: str) -> None:
    adapted = model.adapt_state_dict(dict(state)) if isinstance(model, ESCModelBase) else dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in adapted]
    unexpected = [k for k in adapted if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        raise CheckpointError(f"{name}: does not fit {model.arch_name}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if adapted[key].shape != tensor.shape:
            raise CheckpointError(
                f"{name}: shape mismatch for {key}: checkpoint {list(adapted[key].shape)} vs model {list(tensor.shape)}"
            )
    nn.Module.load_state_dict(model, adapted, strict=True)  # adapted once, above


def save_model(
    model: ESCModelBase, path: PathLike, *, half: bool = False, description: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` to a ``.safetensors`` file with metadata (architecture, hyperparameters,
    scale, package version) that :func:`load_model` reads back.  The write is atomic.

    ``half=True`` stores floating-point tensors as fp16. ``description`` (JSON-serialisable: training recipe,
    measured quality, ...) is stored in the metadata as it is; ``read_checkpoint`` returns it.
    """
    from safetensors.torch import save_file

    from . import __version__

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
        save_file(tensors, temp, metadata={_METADATA_KEY: json.dumps(metadata), "format": "pt"})
    return path
