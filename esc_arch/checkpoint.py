"""Checkpoint reading: any ESC checkpoint, read safely, its architecture inferred from the tensors alone.

Layouts: BasicSR (``params_ema`` / ``params``), neosr, traiNNer-redux (bare safetensors or ``{'metadata', params}``),
esc_arb/LTE (``{'model': {'sd': ...}}``), plain state dicts, and the files ``esc_sr.save_model`` writes.

A checkpoint is someone else's file: nothing in it runs (``torch.load(weights_only=True)`` or safetensors; a plain
pickle or PyTorch's legacy format is not read), and every size it declares is checked before it costs memory,
against limits derived from ``max_parameters`` (:class:`CheckpointLimits`): the file (a regular file, its format
told by its first bytes), the declared sizes (the safetensors header; the zip's records, none compressed, their
CRC-32s), the tensors (:func:`check_state_dict`), then the model, built first on the ``meta`` device
(:func:`build_model`). README.md#reliability lists the checks and the limits. Every refusal is a
:class:`CheckpointError` naming the file and the reason in one line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .attention import BAKE_LIMIT_BYTES, WindowAttention
from .base import ESCModelBase, SharedKernelTrunk
from .detection import infer_architecture
from .errors import CheckpointError, first_line
from .inputs import UnusableFile, open_regular_file

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

_WRAPPER_KEYS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net", "sd")
_PREFIXES = ("module.", "netG.", "_orig_mod.")
#: The safetensors metadata entry :func:`esc_sr.save_model` writes and :func:`load_model` reads: JSON with ``arch``,
#: ``hyperparameters`` (constructor arguments), ``scale``, ``esc_sr_version`` and an optional ``description``.
METADATA_KEY = "esc_sr"
_WEIGHTS = Path(__file__).with_name("weights")
#: The models shipped inside the package, by the name ``load_model`` takes (their cards: ``weights/*.md``).
EMBEDDED_MODELS: dict[str, Path] = {
    "default": _WEIGHTS / "esc_default_x4.safetensors",  # ESC-tiny x4, bicubic degradation
    "real": _WEIGHTS / "esc_real_x4.safetensors",  # ESCRealM-tiny x4, Real-ESRGAN degradations (in training)
}
DEFAULT_MODEL_FILE = EMBEDDED_MODELS["default"]

#: The default ceiling on a checkpoint's parameters (values in its state dict): four times ESC-XL's 12.5 M.
DEFAULT_MAX_PARAMETERS = 50_000_000
_RAISE_HINT = "load_model(..., max_parameters=N) or esc-sr --max-parameters N raises the limit"


@dataclass(frozen=True)
class CheckpointLimits:
    """What a checkpoint may declare, all derived from ``max_parameters`` (values in the state dict, and in the
    model built from it): the tensor data in the file, training copies included (16 bytes per parameter: fp32
    weights, EMA, two Adam moments), the model ready for inference after ``fuse`` (32 bytes per parameter), and,
    in proportion above the default, the number of tensors and the metadata (safetensors header, zip pickle)."""

    max_parameters: int = DEFAULT_MAX_PARAMETERS

    def __post_init__(self) -> None:
        if isinstance(self.max_parameters, bool) or not isinstance(self.max_parameters, int) or self.max_parameters < 1:
            raise ValueError(f"max_parameters must be a positive integer, not {self.max_parameters!r}")

    @property
    def _proportion(self) -> float:
        return max(1.0, self.max_parameters / DEFAULT_MAX_PARAMETERS)

    @property
    def max_stored_bytes(self) -> int:
        return 16 * self.max_parameters

    @property
    def max_model_bytes(self) -> int:
        return 32 * self.max_parameters

    @property
    def max_tensors(self) -> int:
        return int(8192 * self._proportion)

    @property
    def max_metadata_bytes(self) -> int:
        return int(4 * 2**20 * self._proportion)

    @property
    def max_file_bytes(self) -> int:
        return self.max_stored_bytes + self.max_metadata_bytes + 2**20  # + the zip's own records


def _limits(max_parameters: int | CheckpointLimits | None) -> CheckpointLimits:
    if isinstance(max_parameters, CheckpointLimits):
        return max_parameters
    return CheckpointLimits(DEFAULT_MAX_PARAMETERS if max_parameters is None else max_parameters)


def _over(name: object, what: str, limit: str) -> CheckpointError:
    """The one wording of a size refusal: what the checkpoint declares, the limit, and how to raise it."""
    return CheckpointError(f"{name}: {what}, above the limit of {limit} ({_RAISE_HINT})")


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


# -- reading ------------------------------------------------------------------------------------
def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<state dict>"


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _read_file(path: Path, limits: CheckpointLimits) -> tuple[Any, dict[str, str], bool]:
    """The file's object, its safetensors metadata, and whether its tensors are views of the file (zip checkpoints,
    read with ``torch.load(mmap=True)``: nothing is copied before the tensors are checked)."""
    try:
        handle, size = open_regular_file(path)
    except UnusableFile as e:
        raise CheckpointError(f"{path}: {e}") from None
    with handle:
        try:
            head = handle.read(16)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if size > limits.max_file_bytes:
        raise _over(path, f"the file is {_size(size)}",
                    f"{_size(limits.max_file_bytes)} for a checkpoint of at most {limits.max_parameters:,} parameters")
    if head[:4] in _ZIP_MAGIC:
        if path.name.lower().endswith(".safetensors"):  # torch.load would hand it to safetensors by its name
            raise CheckpointError(f"{path}: a PyTorch zip checkpoint, not a safetensors file: rename it to .pth")
        _check_zip(path, size, limits)
        return _torch_load(path), {}, True
    if len(head) > 8 and head[8:9] == b"{":
        return (*_read_safetensors(path, size, int.from_bytes(head[:8], "little"), limits), False)
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: a plain pickle or a checkpoint in PyTorch's legacy format (before 1.6), which is not read: its "
            "sizes cannot be checked before unpickling it; re-save it with torch.save (PyTorch 1.6 or later) or "
            "convert it to .safetensors"
        )
    raise CheckpointError(f"{path}: not a checkpoint, or corrupt (neither a PyTorch zip checkpoint nor a safetensors file)")


def _check_zip(path: Path, size: int, limits: CheckpointLimits) -> None:
    """The zip's own records, with :mod:`zipfile`, before torch reads anything: their number, compression, sizes
    and CRC-32s. (``torch.save`` writes stored records, 64-byte aligned, with CRC-32s.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            _check_records(path, records, size, limits)
            for record in records:
                if record.CRC == 0:  # torch.save(..., compute_crc32=False) leaves it unset
                    continue
                with archive.open(record) as data:  # zipfile checks the CRC-32 when the record ends
                    while data.read(1 << 20):
                        pass
    except CheckpointError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, EOFError, struct.error, ... on damaged files
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from None


def _check_records(path: Path, records: list[zipfile.ZipInfo], size: int, limits: CheckpointLimits) -> None:
    if len(records) > limits.max_tensors + 16:
        raise _over(path, f"holds {len(records):,} records", f"{limits.max_tensors:,} tensors")
    pickles = [r for r in records if r.filename == "data.pkl" or r.filename.endswith("/data.pkl")]
    if not pickles:
        raise CheckpointError(f"{path}: a zip file without data.pkl: not a PyTorch checkpoint")
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: record {record.filename} is compressed (zip method {record.compress_type}); torch.save never "
                "compresses, and a compressed record can expand far beyond the file, so it is not read: re-save the "
                "checkpoint with torch.save"
            )
        if record.file_size != record.compress_size or record.header_offset + record.file_size > size:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint (record {record.filename} declares "
                                  f"{record.file_size:,} bytes the file does not hold)")
    if (largest := max(r.file_size for r in pickles)) > limits.max_metadata_bytes:
        raise _over(path, f"its pickle (data.pkl) is {_size(largest)}", _size(limits.max_metadata_bytes))
    if (stored := sum(r.file_size for r in records)) > limits.max_stored_bytes:
        raise _over(path, f"declares {_size(stored)} of data",
                    f"{_size(limits.max_stored_bytes)} for at most {limits.max_parameters:,} parameters")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused by the safe (weights-only) loader: {detail or first_line(e, 120)}; "
            "the file is corrupt or asks to run code, and was not executed"
        ) from None
    except Exception as e:  # torch's unpickler raises anything from EOFError to IndexError on garbage
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from None


def _read_safetensors(path: Path, size: int, header_bytes: int, limits: CheckpointLimits) -> tuple[StateDict, dict[str, str]]:
    """A safetensors file: the header's length, then (safetensors' own parser) every shape, then the data."""
    if header_bytes > limits.max_metadata_bytes:
        raise _over(path, f"its safetensors header declares {_size(header_bytes)}", _size(limits.max_metadata_bytes))
    if 8 + header_bytes > size:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (a {header_bytes:,}-byte header in a "
                              f"{size:,}-byte file)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if len(keys) > limits.max_tensors:
                raise _over(path, f"holds {len(keys):,} tensors", f"{limits.max_tensors:,}")
            values = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
            if values > limits.max_parameters:
                raise _over(path, f"holds {values:,} values", f"{limits.max_parameters:,} parameters")
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in keys}, metadata
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first_line(e)})") from None


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
        keys = ", ".join(str(k)[:40] for k in list(obj)[:8])
        raise CheckpointError(f"{name}: not a state dict (no tensors; top-level keys: {keys})")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{name}: not a state dict (a tensor is filed under {type(odd).__name__} {str(odd)[:40]}, not a name)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(
    state: Mapping[str, torch.Tensor], *, name: str = "<state dict>", max_parameters: int | CheckpointLimits | None = None
) -> None:
    """Refuse, with a :class:`CheckpointError`, a state dict whose tensors cannot be weights of a model within the
    limits: too many tensors or values, a tensor that is not dense or claims more values than its storage holds
    (a stride-0 ``expand`` of one number posing as a large weight), or a non-finite value (NaN, Inf). Reads only the
    tensors' metadata, then their values once (the finiteness test); allocates nothing large."""
    limits = _limits(max_parameters)
    if len(state) > limits.max_tensors:
        raise _over(name, f"holds {len(state):,} tensors", f"{limits.max_tensors:,}")
    values = 0
    for key, tensor in state.items():
        problem = _tensor_problem(tensor)
        if problem:
            raise CheckpointError(f"{name}: tensor {key} {problem}")
        values += tensor.numel()
    if values > limits.max_parameters:
        raise _over(name, f"holds {values:,} values", f"{limits.max_parameters:,} parameters")
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{name}: tensor {key} holds {bad:,} non-finite value{'s' * (bad != 1)} (NaN or Inf) of "
                f"{tensor.numel():,}; the checkpoint is damaged (a model with them computes only NaN)"
            )


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    if tensor.layout != torch.strided:
        return f"is a {str(tensor.layout).replace('torch.', '')} tensor; a checkpoint of weights holds dense tensors"
    if tensor.device.type == "meta":
        return "holds no data (a meta tensor)"
    if tensor.is_quantized or tensor.is_complex():
        return f"has dtype {str(tensor.dtype).replace('torch.', '')}, which no ESC weight has"
    numel = tensor.numel()
    if numel == 0:
        return None
    stored = tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()
    if numel > stored:
        return (
            f"claims shape {list(tensor.shape)} ({numel:,} values) over {max(stored, 0):,} stored values (strides "
            f"{list(tensor.stride())}): an expanded or overlapping view, not a stored weight"
        )
    return None


def read_checkpoint(path: PathLike, *, max_parameters: int | CheckpointLimits | None = None) -> tuple[StateDict, dict[str, Any]]:
    """Read a checkpoint file: (canonical state dict, ESC-SR metadata or {}), every size it declares checked first,
    then the tensors (:func:`check_state_dict`); the state dict owns its memory (no view of the file stays mapped)."""
    path = Path(path)
    limits = _limits(max_parameters)
    raw, file_metadata, mapped = _read_file(path, limits)
    state = canonicalize_state_dict(raw, path)
    check_state_dict(state, name=str(path), max_parameters=limits)
    if mapped:  # views of the file (torch.load(mmap=True)): copied, so that nothing keeps the file mapped
        state = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    del raw
    return state, _esc_metadata(file_metadata)


def _esc_metadata(file_metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ESC-SR metadata of a file ``esc_sr.save_model`` wrote, or {} (advisory: anything malformed is ignored)."""
    try:
        metadata = json.loads(file_metadata.get(METADATA_KEY, "{}"))
    except (TypeError, ValueError, RecursionError):
        return {}
    if not isinstance(metadata, dict):
        return {}
    hyper = metadata.get("hyperparameters")
    if hyper is not None and not (isinstance(hyper, dict) and all(isinstance(k, str) for k in hyper)):
        metadata.pop("hyperparameters")
    return metadata


def read_state_dict(path: PathLike, *, max_parameters: int | CheckpointLimits | None = None) -> StateDict:
    """The canonical state dict of a checkpoint file (wrappers unwrapped, prefixes stripped)."""
    return read_checkpoint(path, max_parameters=max_parameters)[0]


# -- loading ------------------------------------------------------------------------------------
def load_model(
    source: PathLike | Mapping[str, Any], *, max_parameters: int | CheckpointLimits | None = None, **overrides: Any
) -> ESCModelBase:
    """Build and load an ESC model, in eval mode, from a checkpoint path, a state dict, or an embedded model's name
    (``'default'``, ``'real'``: :data:`EMBEDDED_MODELS`). Raises :class:`CheckpointError`, one line naming the file.

    The variant and every hyperparameter come from the tensors (and from the metadata ``esc_sr.save_model`` writes).
    ``overrides`` replace inferred keyword arguments, e.g. ``attn_type='naive'``, or ``upscaling_factor=4`` to load
    an x2 ESC checkpoint into an x4 model (its sub-pixel head is resized as upstream does). ``max_parameters``
    (default :data:`DEFAULT_MAX_PARAMETERS`) bounds what the checkpoint may declare and the model built from it.
    """
    limits = _limits(max_parameters)
    if isinstance(source, str) and source in EMBEDDED_MODELS:
        if not EMBEDDED_MODELS[source].exists():
            raise CheckpointError(f"{EMBEDDED_MODELS[source]}: the embedded model {source!r} is missing from this "
                                  "installation")
        source = EMBEDDED_MODELS[source]
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        state, metadata = read_checkpoint(source, max_parameters=limits)
    else:
        state, metadata = canonicalize_state_dict(source, None), {}
        check_state_dict(state, name=name, max_parameters=limits)
    try:
        cls, kwargs = infer_architecture(state)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if metadata.get("arch") == cls.arch_name:
        for key, value in (metadata.get("hyperparameters") or {}).items():
            kwargs.setdefault(key, value)
    kwargs.update(overrides)
    return build_model(cls, kwargs, state, name=name, max_parameters=limits)


def build_model(
    cls: type[ESCModelBase], kwargs: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, name: str = "<state dict>",
    max_parameters: int | CheckpointLimits | None = None,
) -> ESCModelBase:
    """``cls(**kwargs)`` with ``state`` loaded (strictly), in eval mode -- checked before it is allocated.

    The model is first built on the ``meta`` device (no memory): its size is checked against the limits, then with
    the constants :func:`esc_arch.fuse` will bake, and ``state``'s keys and shapes are compared with it. Only then
    is the real model built. Raises :class:`CheckpointError` naming ``name``.
    """
    limits = _limits(max_parameters)
    kwargs = dict(kwargs)
    blueprint = _construct(cls, kwargs, name, device="meta")
    built = f"{cls.arch_name}({_kwargs_text(kwargs)}) would"
    values = sum(t.numel() for t in blueprint.state_dict().values())
    if values > limits.max_parameters:
        raise _over(name, f"{built} have {values:,} parameters", f"{limits.max_parameters:,}")
    needed = _inference_bytes(blueprint)
    if needed > limits.max_model_bytes:
        raise _over(name, f"{built} need {_size(needed)} ready for inference (its weights and baked attention biases)",
                    _size(limits.max_model_bytes))
    bias = max((m.num_heads * m.window_size**4 * 4 for m in blueprint.modules() if isinstance(m, WindowAttention)),
               default=0)
    if bias > limits.max_model_bytes:  # an unbaked bias is gathered in every forward pass, whatever the image size
        raise _over(name, f"{built} gather a {_size(bias)} attention bias in every forward pass",
                    _size(limits.max_model_bytes))
    _fit(blueprint, state, name)
    del blueprint
    model = _construct(cls, kwargs, name, device=None)
    adapted = _fit(model, state, name)
    try:
        nn.Module.load_state_dict(model, adapted, strict=True)  # adapted once, above
    except Exception as e:
        raise CheckpointError(f"{name}: cannot load the weights into {cls.arch_name}: {first_line(e)}") from None
    return model.eval()


def _inference_bytes(model: nn.Module) -> int:
    """Bytes ``model`` holds once :func:`esc_arch.fuse` has baked its constants, in float32, from its modules'
    sizes alone (so it can be asked of a model on the meta device): every parameter and buffer, the ensembled large
    kernel of each shared-kernel trunk, and each window attention's (heads, ws^2, ws^2) bias where it is baked."""
    total = sum(t.numel() * 4 for t in chain(model.parameters(), model.buffers()))
    for module in model.modules():
        if isinstance(module, SharedKernelTrunk):
            total += module.plk_filter.numel() * 4
        elif isinstance(module, WindowAttention):
            bias = module.num_heads * module.window_size**4 * 4
            total += bias if bias <= BAKE_LIMIT_BYTES else 0
    return total


def _construct(cls: type[ESCModelBase], kwargs: Mapping[str, Any], name: str, *, device: str | None) -> ESCModelBase:
    try:
        if device is None:
            return cls(**kwargs)
        with torch.device(device):
            return cls(**kwargs)
    except Exception as e:  # the arguments come from the file: any failure to build is the file's
        raise CheckpointError(f"{name}: cannot build {cls.arch_name}({_kwargs_text(kwargs)}): {first_line(e)}") from None


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}"[:60] for k, v in kwargs.items())


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> StateDict:
    """``state`` adapted to ``model`` (upstream quirks), after checking that its keys and shapes are the model's."""
    try:
        adapted = model.adapt_state_dict(dict(state)) if isinstance(model, ESCModelBase) else dict(state)
    except Exception as e:
        raise CheckpointError(f"{name}: does not fit {getattr(model, 'arch_name', type(model).__name__)}: {first_line(e)}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in adapted]
    unexpected = [k for k in adapted if k not in expected]
    parts = [f"{label} {len(keys)} keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        raise CheckpointError(f"{name}: does not fit {model.arch_name}: {'; '.join(parts)}")
    for key, tensor in expected.items():
        if adapted[key].shape != tensor.shape:
            raise CheckpointError(
                f"{name}: shape mismatch for {key}: checkpoint {list(adapted[key].shape)} vs model {list(tensor.shape)}"
            )
    return adapted
