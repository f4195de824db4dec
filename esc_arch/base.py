"""What every ESC model shares: recorded hyperparameters, the attention switch, and the inference bake (``fuse``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .attention import WindowAttention, normalize_backend
from .layers import geometric_ensemble


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

    # -- inference re-parameterisation ----------------------------------------------------------
    @property
    def is_fused(self) -> bool:
        """True after :meth:`fuse`: constant tensors are baked and the model is for inference only."""
        return self.__dict__.get("_fused", False)

    @torch.no_grad()
    def fuse(self) -> "ESCModelBase":
        """Bake what is constant at inference, once, as upstream's ``convert()`` does: the geometric-ensembled
        large kernel and every window's attention bias. Outputs are unchanged; an unfused model computes the same
        tensors in every forward pass. Returns the model in eval mode; a fused model cannot be trained, and its
        weights cannot be replaced (load them first, then fuse). Idempotent."""
        self.eval()
        for module in self.modules():
            if isinstance(module, (SharedKernelTrunk, WindowAttention)):
                module.bake()
        self.__dict__["_fused"] = True
        return self

    def train(self, mode: bool = True):
        if mode and self.is_fused:
            raise RuntimeError(
                f"{self.arch_name} was fused for inference (esc_arch.fuse); build or load an unfused model to train it"
            )
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.is_fused:
            raise RuntimeError(f"{self.arch_name} is fused: load its weights before esc_arch.fuse(), not after")
        return super().load_state_dict(self.adapt_state_dict(dict(state_dict)), strict=strict, assign=assign)

    # -- the trunk ------------------------------------------------------------------------------
    def run_blocks(self, feat: torch.Tensor) -> torch.Tensor:
        """The blocks in turn, all with the model's shared large kernel (ensembled once per pass)."""
        large_kernel = self.large_kernel()
        for block in self.blocks:
            feat = block(feat, large_kernel)
        return feat

    # -- checkpoints ----------------------------------------------------------------------------
    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``state_dict`` rewritten to fit this model (upstream loader quirks); no-op here."""
        return state_dict

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())


class SharedKernelTrunk(ESCModelBase):
    """Models whose blocks share one raw ``plk_filter``, used through its geometric ensemble."""

    plk_filter: nn.Parameter
    blocks: nn.ModuleList

    def large_kernel(self) -> torch.Tensor:
        """The geometric-ensembled shared kernel: baked by :meth:`bake`, else computed (cheap: 8 flips of a
        pdim x pdim x k x k tensor)."""
        baked = self._buffers.get("fused_large_kernel")
        return geometric_ensemble(self.plk_filter) if baked is None else baked

    def bake(self) -> None:
        """Store the ensembled kernel as a (non-persistent) buffer, so it follows ``.to()`` and ``.half()``."""
        self.register_buffer("fused_large_kernel", geometric_ensemble(self.plk_filter).detach(), persistent=False)
