"""Which ESC variant a state dict holds, and its hyperparameters, read from the tensors alone.

One table, :data:`VARIANTS`, in detection order: each row names the keys that identify a variant and the function
that reads its constructor arguments from tensor shapes. :func:`esc_arch.load_model` and the spandrel
architectures (:mod:`esc_arch.spandrel`) both use it, so a checkpoint is recognised the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import ESCModelBase
from .errors import CheckpointError, first_line
from .esc import ESC, ESCFP
from .esc_real import ESCReal, ESCRealM
from .lte import ESCLTE
from .upsamplers import UNIUPSAMPLE_METHODS_V2, UNIUPSAMPLE_METHODS_V3, UPSAMPLERS

StateDict = Mapping[str, torch.Tensor]

# Keys every ESC trunk has (window attention, conv stage, final conv), relative to the trunk.
_TRUNK_KEYS = (
    "blocks.0.ln_proj.weight",
    "blocks.0.proj.proj.weight",
    "blocks.0.ln_attn.weight",
    "blocks.0.attn.relative_position_bias",
    "blocks.0.attn.to_qkv.weight",
    "blocks.0.attn.to_out.weight",
    "blocks.0.pconvs.0.aggr.weight",
    "blocks.0.convffns.0.proj.weight",
    "blocks.0.ln_out.weight",
    "blocks.0.conv_out.weight",
    "last.weight",
)


def _trunk(prefix: str = "") -> tuple[str, ...]:
    return tuple(prefix + key for key in _TRUNK_KEYS)


@dataclass(frozen=True)
class Variant:
    """One ESC architecture: how to recognise its state dicts and read its hyperparameters from them."""

    cls: type[ESCModelBase]
    keys: tuple[str, ...]
    """Keys that must all be present."""
    hyperparameters: Callable[[StateDict], dict[str, Any]]
    """Constructor keyword arguments, from tensor shapes."""
    any_of: tuple[tuple[str, ...], ...] = field(default=())
    """Alternatives (e.g. the possible heads): when given, at least one group must be present in full."""

    @property
    def name(self) -> str:
        return self.cls.arch_name

    def matches(self, state: Mapping[str, Any]) -> bool:
        return all(k in state for k in self.keys) and (
            not self.any_of or any(all(k in state for k in group) for group in self.any_of)
        )

    def missing(self, state: Mapping[str, Any]) -> list[str]:
        """Required keys absent from ``state`` (the closest head alternative counted)."""
        missing = [k for k in self.keys if k not in state]
        if self.any_of:
            missing += min(([k for k in group if k not in state] for group in self.any_of), key=len)
        return missing


# -- reading hyperparameters ------------------------------------------------------------------------
def _seq_len(state: Mapping[str, Any], prefix: str, *, every: int = 1) -> int:
    """Length of the module list at ``prefix``, whose modules with weights sit at every ``every``-th index
    (2 for an MLP whose activations have none). Other indices are refused: the length decides what is built."""
    start = len(prefix) + 1
    indices = {int(head) for k in state if k.startswith(prefix + ".") and (head := k[start:].split(".")[0]).isdigit()}
    if indices != set(range(0, every * len(indices), every)):
        raise CheckpointError(f"{prefix} has indices {_ranges(indices)}, not 0..n-1")
    return every * (len(indices) - 1) + 1 if indices else 0


def _ranges(indices: set[int]) -> str:
    ordered = sorted(indices)
    return ", ".join(map(str, ordered[:6])) + (f", ... {ordered[-1]}" if len(ordered) > 6 else "")


def _isqrt_exact(value: int, what: str) -> int:
    root = math.isqrt(value)
    if root * root != value:
        raise CheckpointError(f"{what} has {value} channels, which is not 3 x a square scale")
    return root


def _entries_held(state: Mapping[str, Any], prefix: str, count: int) -> None:
    """Refuse a module list of ``count`` entries that the checkpoint cannot fill. ESC builds every entry of a list
    (blocks, conv blocks) alike, so ``count`` entries need ``count`` times the tensors of entry 0: checked before
    anything is built, since the count decides how much is built (and a key ``blocks.999.x`` costs one tensor)."""
    per_entry = sum(1 for k in state if k.startswith(f"{prefix}.0."))
    held = sum(1 for k in state if k.startswith(f"{prefix}."))
    if count * per_entry > held:
        raise CheckpointError(
            f"{prefix} has {count} entries but only {held} tensors for them, not {per_entry} for each as {prefix}.0 has"
        )


def _trunk_hyperparameters(state: StateDict, prefix: str = "") -> dict[str, Any]:
    rpb = state[f"{prefix}blocks.0.attn.relative_position_bias"]
    dim = state[f"{prefix}blocks.0.attn.to_qkv.weight"].shape[1]
    hidden = state[f"{prefix}blocks.0.convffns.0.proj.weight"].shape[0]
    n_blocks = _seq_len(state, f"{prefix}blocks")
    conv_blocks = _seq_len(state, f"{prefix}blocks.0.pconvs")
    _entries_held(state, f"{prefix}blocks", n_blocks)
    _entries_held(state, f"{prefix}blocks.0.pconvs", conv_blocks)
    return {
        "dim": dim,
        "n_blocks": n_blocks,
        "conv_blocks": conv_blocks,
        "window_size": (math.isqrt(rpb.shape[1]) + 1) // 2,
        "num_heads": rpb.shape[0],
        "exp_ratio": hidden / dim,
    }


def _esc(state: StateDict) -> dict[str, Any]:
    return _trunk_hyperparameters(state) | dict(
        pdim=state["plk_filter"].shape[0],
        kernel_size=state["plk_filter"].shape[-1],
        upscaling_factor=_isqrt_exact(state["to_img.weight"].shape[0] // 3, "to_img"),
        use_ln="blocks.0.lns.0.weight" in state,
    )


def _esc_fp(state: StateDict) -> dict[str, Any]:
    return _trunk_hyperparameters(state) | dict(
        pdim=state["lk_channel"].shape[0],
        kernel_size=state["lk_spatial"].shape[-1],
        upscaling_factor=_isqrt_exact(state["to_img.weight"].shape[0] // 3, "to_img"),
    )


def _esc_real(state: StateDict) -> dict[str, Any]:
    kwargs = _trunk_hyperparameters(state) | dict(pdim=state["plk_filter"].shape[0], kernel_size=state["plk_filter"].shape[-1])
    if "to_img.offset.weight" in state:
        groups_offsets = state["to_img.offset.weight"].shape[0]  # 2 * 4 groups * s^2
        return kwargs | dict(upsampler="dysample", upscaling_factor=_isqrt_exact(groups_offsets // 8, "to_img.offset"))
    if "to_img.4.weight" in state:
        return kwargs | dict(upsampler="nearest+conv", upscaling_factor=4)
    last_conv = max(int(k.split(".")[1]) for k in state if k.startswith("to_img.") and k.endswith(".weight"))
    return kwargs | dict(upsampler="nearest+conv-neosr", upscaling_factor=2 ** (last_conv // 5))


def _esc_realm(state: StateDict) -> dict[str, Any]:
    version, index, head_scale, _in, _out, mid_dim, _group = (int(v) for v in state["to_img.MetaUpsample"].tolist())
    methods = UNIUPSAMPLE_METHODS_V3 if version >= 3 else UNIUPSAMPLE_METHODS_V2
    method = methods[index] if 0 <= index < len(methods) else f"#{index}"
    if method not in UPSAMPLERS:
        raise CheckpointError(f"ESCRealM upsampler {method!r} (MetaUpsample version {version}) is not supported")
    if "proj.1.weight" in state:
        unshuffle = _isqrt_exact(state["proj.1.weight"].shape[1] // 3, "proj.1")
        scale, unshuffle_mod = 4 // unshuffle, True
    else:
        scale, unshuffle_mod = head_scale, head_scale >= 3
    return _trunk_hyperparameters(state) | dict(
        pdim=state["plk_filter"].shape[0],
        kernel_size=state["plk_filter"].shape[-1],
        upscaling_factor=scale,
        mid_dim=mid_dim,
        upsampler=method,
        unshuffle_mod=unshuffle_mod,
    )


def _esc_lte(state: StateDict) -> dict[str, Any]:
    n_linear = _seq_len(state, "imnet.layers", every=2)
    hidden = tuple(state[f"imnet.layers.{i}.weight"].shape[0] for i in range(0, n_linear - 1, 2))
    return _trunk_hyperparameters(state, "encoder.") | dict(
        pdim=state["encoder.plk_filter"].shape[0],
        kernel_size=state["encoder.plk_filter"].shape[-1],
        hidden_dim=state["coef.weight"].shape[0],
        mlp_hidden=hidden,
    )


# -- the table ----------------------------------------------------------------------------------------
VARIANTS: tuple[Variant, ...] = (
    Variant(ESCLTE, ("encoder.plk_filter", "encoder.proj.weight", *_trunk("encoder."), "coef.weight", "freq.weight",
                     "phase.weight", "imnet.layers.0.weight"), _esc_lte),
    Variant(ESCFP, ("lk_channel", "lk_spatial", "proj.weight", *_trunk(), "blocks.0.pconvs.0.plk.proj.1.weight",
                    "blocks.0.pconvs.0.plk.proj.3.weight", "ln_last.weight", "to_img.weight"), _esc_fp),
    # ESCRealM before ESCReal: both have the real-world trunk; only ESCRealM has to_img.MetaUpsample.
    Variant(ESCRealM, ("plk_filter", *_trunk(), "blocks.0.lns.0.weight", "to_img.MetaUpsample"), _esc_realm,
            any_of=(("proj.weight",), ("proj.1.weight",))),  # plain, or pixel-unshuffle first
    Variant(ESCReal, ("plk_filter", "proj.weight", *_trunk(), "blocks.0.lns.0.weight", "skip.0.weight",
                      "skip.1.weight", "skip.3.weight"), _esc_real,
            any_of=(("to_img.1.weight", "to_img.4.weight", "to_img.6.weight", "to_img.8.weight"),  # official
                    ("to_img.init_pos", "to_img.offset.weight", "to_img.end_conv.weight"),  # DySample
                    ("to_img.1.weight", "to_img.3.weight"))),  # neosr's nearest+conv
    Variant(ESC, ("plk_filter", "proj.weight", *_trunk(), "blocks.0.pconvs.0.plk.dwc_proj.1.weight",
                  "blocks.0.pconvs.0.plk.dwc_proj.3.weight", "to_img.weight"), _esc),
)

#: The ESC model classes by architecture name (the upstream class names).
ARCHITECTURES: dict[str, type[ESCModelBase]] = {v.name: v.cls for v in VARIANTS}


def detect_variant(state: Mapping[str, Any]) -> Variant | None:
    """The first row of :data:`VARIANTS` whose keys ``state`` has, or None."""
    return next((v for v in VARIANTS if v.matches(state)), None)


def detect_architecture(state: Mapping[str, Any]) -> str | None:
    """The ESC architecture name of a (canonical) state dict, or None."""
    variant = detect_variant(state)
    return variant.name if variant else None


def infer_architecture(state: StateDict) -> tuple[type[ESCModelBase], dict[str, Any]]:
    """Detect the ESC variant of a (canonical) state dict and every hyperparameter from its tensors.

    Raises :class:`CheckpointError` (without a file name) when the keys belong to no ESC variant, or when the
    tensors it reads cannot be those of the variant (a shape of the wrong rank, a zero width, ...): their shapes
    come from the file, so any failure to read them is reported as a malformed checkpoint, never another exception.
    """
    variant = detect_variant(state)
    if variant is None:
        closest = min(VARIANTS, key=lambda v: len(v.missing(state)))
        raise CheckpointError(f"not an ESC checkpoint (closest is {closest.name}, which needs {', '.join(closest.missing(state)[:6])})")
    try:
        kwargs = variant.hyperparameters(state)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"incomplete {variant.name} checkpoint (missing {e.args[0]})") from None
    except Exception as e:  # the shapes come from the file: one that breaks the reading is a malformed file
        raise CheckpointError(f"malformed {variant.name} checkpoint ({type(e).__name__}: {first_line(e)})") from None
    bad = next(((k, v) for k, v in kwargs.items() if not _plausible(v)), None)
    if bad is not None:
        raise CheckpointError(f"malformed {variant.name} checkpoint: its tensors give {bad[0]}={bad[1]!r}")
    return variant.cls, kwargs


# Sizes read from shapes are positive; anything above this is no ESC (and would overflow the layers' arithmetic).
_LARGEST_SIZE = 2**31 - 1


def _plausible(value: Any) -> bool:
    if isinstance(value, (bool, str)) or value is None:
        return True
    if isinstance(value, (int, float)):
        return 0 < value <= _LARGEST_SIZE  # False for NaN and infinities too
    if isinstance(value, (tuple, list)):
        return all(_plausible(v) for v in value)
    return True

