"""Checkpoint I/O: read any ESC checkpoint safely, infer its architecture from the tensors alone,
and write safetensors with metadata.

Supported layouts: BasicSR (``params_ema`` / ``params``), neosr, traiNNer-redux (bare safetensors
or ``{'metadata', params}``), esc_arb/LTE (``{'model': {'sd': ...}}``), plain state dicts, and
the files :func:`save_model` writes.  Pickles are read with ``torch.load(weights_only=True)``, so a
checkpoint can never run code while loading.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .atomic import atomic_write
from .base import ESCModelBase
from .errors import ESCError
from .esc import ESC, ESCFP
from .esc_real import ESCReal, ESCRealM
from .lte import ESCLTE
from .upsamplers import UNIUPSAMPLE_METHODS_V2, UNIUPSAMPLE_METHODS_V3, UPSAMPLERS

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

_WRAPPER_KEYS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net", "sd")
_PREFIXES = ("module.", "netG.", "_orig_mod.")
_METADATA_KEY = "esc_sr"
ARCHITECTURES: dict[str, type[ESCModelBase]] = {c.arch_name: c for c in (ESC, ESCFP, ESCReal, ESCRealM, ESCLTE)}
DEFAULT_MODEL_FILE = Path(__file__).with_name("weights") / "esc_default_x4.safetensors"


class CheckpointError(ESCError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


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


# -- architecture inference --------------------------------------------------------------------
def _seq_len(state: Mapping[str, Any], prefix: str) -> int:
    indices = {int(k[len(prefix) + 1 :].split(".")[0]) for k in state if k.startswith(prefix + ".") and k[len(prefix) + 1 :].split(".")[0].isdigit()}
    return max(indices) + 1 if indices else 0


def _trunk_hyperparameters(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Any]:
    rpb = state[f"{prefix}blocks.0.attn.relative_position_bias"]
    dim = state[f"{prefix}blocks.0.attn.to_qkv.weight"].shape[1]
    hidden = state[f"{prefix}blocks.0.convffns.0.proj.weight"].shape[0]
    return {
        "dim": dim,
        "n_blocks": _seq_len(state, f"{prefix}blocks"),
        "conv_blocks": _seq_len(state, f"{prefix}blocks.0.pconvs"),
        "window_size": (math.isqrt(rpb.shape[1]) + 1) // 2,
        "num_heads": rpb.shape[0],
        "exp_ratio": hidden / dim,
    }


def _isqrt_exact(value: int, what: str) -> int:
    root = math.isqrt(value)
    if root * root != value:
        raise CheckpointError(f"{what} has {value} channels, which is not 3 x a square scale")
    return root


# Keys that identify each architecture, most specific first.
_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("ESCLTE", ("encoder.plk_filter", "encoder.proj.weight", "coef.weight", "freq.weight", "phase.weight", "imnet.layers.0.weight")),
    ("ESCFP", ("lk_channel", "lk_spatial", "proj.weight", "ln_last.weight", "blocks.0.attn.relative_position_bias", "to_img.weight")),
    ("ESCRealM", ("plk_filter", "to_img.MetaUpsample", "blocks.0.attn.relative_position_bias", "last.weight")),
    ("ESCReal", ("plk_filter", "skip.3.weight", "blocks.0.lns.0.weight", "blocks.0.attn.relative_position_bias", "last.weight")),
    ("ESC", ("plk_filter", "proj.weight", "blocks.0.attn.relative_position_bias", "last.weight", "to_img.weight")),
]


def detect_architecture(state: Mapping[str, Any]) -> str | None:
    """The ESC architecture name whose signature keys are all present, or None."""
    for name, keys in _SIGNATURES:
        if all(k in state for k in keys):
            return name
    return None


def _missing_keys_hint(state: Mapping[str, Any]) -> str:
    name, keys = min(_SIGNATURES, key=lambda item: sum(k not in state for k in item[1]))
    missing = [k for k in keys if k not in state]
    return f"closest is {name}, which needs {', '.join(missing)}"


def infer_architecture(state: Mapping[str, torch.Tensor]) -> tuple[type[ESCModelBase], dict[str, Any]]:
    """Detect the ESC variant of a (canonical) state dict and every hyperparameter from its tensors.

    Raises :class:`CheckpointError` (without a file name) when the keys belong to no ESC variant.
    """
    name = detect_architecture(state)
    if name is None:
        raise CheckpointError(f"not an ESC checkpoint ({_missing_keys_hint(state)})")
    try:
        return ARCHITECTURES[name], _INFER[name](state)
    except KeyError as e:
        raise CheckpointError(f"incomplete {name} checkpoint (missing {e.args[0]})") from None


def _infer_esc(state):
    kwargs = _trunk_hyperparameters(state)
    kwargs.update(
        pdim=state["plk_filter"].shape[0],
        kernel_size=state["plk_filter"].shape[-1],
        upscaling_factor=_isqrt_exact(state["to_img.weight"].shape[0] // 3, "to_img"),
        use_ln="blocks.0.lns.0.weight" in state,
    )
    return kwargs


def _infer_esc_fp(state):
    kwargs = _trunk_hyperparameters(state)
    kwargs.update(
        pdim=state["lk_channel"].shape[0],
        kernel_size=state["lk_spatial"].shape[-1],
        upscaling_factor=_isqrt_exact(state["to_img.weight"].shape[0] // 3, "to_img"),
    )
    return kwargs


def _infer_esc_real(state):
    kwargs = _trunk_hyperparameters(state)
    kwargs.update(pdim=state["plk_filter"].shape[0], kernel_size=state["plk_filter"].shape[-1])
    if "to_img.offset.weight" in state:
        groups_offsets = state["to_img.offset.weight"].shape[0]  # 2 * 4 groups * s^2
        kwargs.update(upsampler="dysample", upscaling_factor=_isqrt_exact(groups_offsets // 8, "to_img.offset"))
    elif "to_img.4.weight" in state:
        kwargs.update(upsampler="nearest+conv", upscaling_factor=4)
    else:
        last_conv = max(int(k.split(".")[1]) for k in state if k.startswith("to_img.") and k.endswith(".weight"))
        kwargs.update(upsampler="nearest+conv-neosr", upscaling_factor=2 ** (last_conv // 5))
    return kwargs


def _infer_esc_realm(state):
    kwargs = _trunk_hyperparameters(state)
    version, index, head_scale, _in, _out, mid_dim, _group = (int(v) for v in state["to_img.MetaUpsample"].tolist())
    methods = UNIUPSAMPLE_METHODS_V3 if version >= 3 else UNIUPSAMPLE_METHODS_V2
    method = methods[index] if index < len(methods) else f"#{index}"
    if method not in UPSAMPLERS:
        raise CheckpointError(f"ESCRealM upsampler {method!r} (MetaUpsample version {version}) is not supported")
    if "proj.1.weight" in state:
        unshuffle = _isqrt_exact(state["proj.1.weight"].shape[1] // 3, "proj.1")
        scale, unshuffle_mod = 4 // unshuffle, True
    else:
        scale, unshuffle_mod = head_scale, head_scale >= 3
    kwargs.update(
        pdim=state["plk_filter"].shape[0],
        kernel_size=state["plk_filter"].shape[-1],
        upscaling_factor=scale,
        mid_dim=mid_dim,
        upsampler=method,
        unshuffle_mod=unshuffle_mod,
    )
    return kwargs


def _infer_esc_lte(state):
    kwargs = _trunk_hyperparameters(state, "encoder.")
    n_linear = _seq_len(state, "imnet.layers")
    hidden = tuple(state[f"imnet.layers.{i}.weight"].shape[0] for i in range(0, n_linear - 1, 2))
    kwargs.update(
        pdim=state["encoder.plk_filter"].shape[0],
        kernel_size=state["encoder.plk_filter"].shape[-1],
        hidden_dim=state["coef.weight"].shape[0],
        mlp_hidden=hidden,
    )
    return kwargs


_INFER = {"ESC": _infer_esc, "ESCFP": _infer_esc_fp, "ESCReal": _infer_esc_real, "ESCRealM": _infer_esc_realm, "ESCLTE": _infer_esc_lte}


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
    model.load_state_dict(adapted, strict=True)


def save_model(model: ESCModelBase, path: PathLike, *, half: bool = False) -> Path:
    """Write ``model`` to a ``.safetensors`` file with metadata (architecture, hyperparameters,
    scale, package version) that :func:`load_model` reads back.  The write is atomic.

    ``half=True`` stores floating-point tensors as fp16.
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
    with atomic_write(path) as temp:
        save_file(tensors, temp, metadata={_METADATA_KEY: json.dumps(metadata), "format": "pt"})
    return path
