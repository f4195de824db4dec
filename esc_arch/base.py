"""What every ESC model shares: recorded hyperparameters, the attention switch, and inference caches."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .attention import WindowAttention, normalize_backend
from .layers import geometric_ensemble


def _tracing() -> bool:
    """True under torch.compile / torch.export / jit tracing, where tensors must not be cached."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _version_of(tensor: torch.Tensor) -> int:
    """In-place modification counter; inference tensors (ComfyUI builds models under
    ``torch.inference_mode``) have none and cannot be modified outside it, so they count as -1."""
    return -1 if tensor.is_inference() else tensor._version


class ESCModelBase(nn.Module):
    """Base class of the ESC models.

    Attributes every model exposes (hosts rely on them):
      ``arch_name``        the upstream class name ('ESC', 'ESCFP', 'ESCReal', 'ESCRealM', 'ESCLTE');
      ``hyperparameters``  the keyword arguments that rebuild the model;
      ``scale``            output size / input size;
      ``window_size``      the attention window; the paper's evaluation reflect-pads inputs to it;
      ``arbitrary_scale``  True when the model renders any real factor (``upscale_by``) rather than ``scale``;
      ``supports_half``    False when fp16/bf16 inference is measured to be inaccurate (hosts then run fp32).
    """

    arch_name: ClassVar[str] = ""
    arbitrary_scale: ClassVar[bool] = False
    supports_half: ClassVar[bool] = True
    hyperparameters: dict[str, Any]
    scale: int
    window_size: int

    def _record(self, arguments: dict[str, Any]) -> None:
        self.hyperparameters = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
        if "attn_type" in self.hyperparameters:
            self.hyperparameters["attn_type"] = normalize_backend(self.hyperparameters["attn_type"])

    # -- attention ------------------------------------------------------------------------------
    @property
    def attn_type(self) -> str:
        """The attention backend the window-attention layers use."""
        return self.hyperparameters["attn_type"]

    def set_attention_backend(self, backend: str) -> "ESCModelBase":
        """Switch every window-attention layer to ``backend`` ('sdpa', 'flex' or 'naive'), in place."""
        backend = normalize_backend(backend)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.attn_type = backend
        self.hyperparameters["attn_type"] = backend
        return self

    # -- inference caches -----------------------------------------------------------------------
    def _cached(self, name: str, source: torch.Tensor, compute) -> torch.Tensor:
        """``compute()`` once per version of ``source`` at inference; every call while training."""
        if self.training or torch.is_grad_enabled() or _tracing():
            return compute()
        key = (_version_of(source), source.data_ptr(), source.device, source.dtype)
        caches = self.__dict__.setdefault("_inference_cache", {})
        hit = caches.get(name)
        if hit is None or hit[0] != key:
            hit = (key, compute())
            caches[name] = hit
        return hit[1]

    def clear_inference_cache(self) -> None:
        """Forget precomputed kernels and attention biases (they are rebuilt on the next forward)."""
        self.__dict__.pop("_inference_cache", None)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.clear_cache()

    def train(self, mode: bool = True):
        # Training loops may rewrite weights through ``param.data`` (BasicSR's EMA does), which does
        # not bump the version counters the caches are keyed on; every train()/eval() starts afresh.
        self.clear_inference_cache()
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to()/.half()/.cuda() invalidate device/dtype-bound caches
        self.clear_inference_cache()
        return super()._apply(fn, recurse)

    # -- checkpoints ----------------------------------------------------------------------------
    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``state_dict`` rewritten to fit this model (upstream loader quirks); no-op here."""
        return state_dict

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.clear_inference_cache()
        return super().load_state_dict(self.adapt_state_dict(dict(state_dict)), strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())


class SharedKernelTrunk(ESCModelBase):
    """Models whose blocks share one raw ``plk_filter``, used through its geometric ensemble."""

    plk_filter: nn.Parameter
    blocks: nn.ModuleList

    def large_kernel(self) -> torch.Tensor:
        """The geometric-ensembled shared kernel (computed once per weight version at inference)."""
        return self._cached("large_kernel", self.plk_filter, lambda: geometric_ensemble(self.plk_filter))

    def run_blocks(self, feat: torch.Tensor) -> torch.Tensor:
        lk = self.large_kernel()
        for block in self.blocks:
            feat = block(feat, lk)
        return feat
