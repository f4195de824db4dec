"""``prepare(model, device, dtype)``: a plain ESC model made ready for inference on one device and dtype, once.

The prepared model holds the plain one (its weights, unchanged) and a :class:`~esc_runtime.forwards.Plan`: the
implementation each kind of layer runs, chosen by :func:`esc_runtime.dispatch.choose`. Calling it runs the
architecture's forward pass through that plan, whole or layer-streamed (``maps``). Training, ONNX export and
``torch.compile`` use the plain model.
"""

from __future__ import annotations

import copy
from typing import Any, Collection

import torch
from torch import nn

import esc_arch
from esc_arch import ESCLTE, ESCModelBase
from esc_arch.attention import WindowAttention
from esc_arch.blocks import ConvAttentionWrapper, ESCBlock
from esc_arch.layers import ConvFFN

from . import onednn, switches
from .dispatch import Choice, choose
from .forwards import FORWARDS, Plan, lte_encode_maps
from .layers import Target
from .streaming import WHOLE, MapRunner


def _first(model: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


def plan(model: nn.Module, target: Target, disable: Collection[str] = ()) -> Plan:
    """The implementation of each kind of layer in ``model`` on ``target``."""
    block = _first(model, ESCBlock)
    layers = {
        "window attention": _first(model, WindowAttention),
        "ConvFFN": _first(model, ConvFFN),
        "partial convolution": _first(model, ConvAttentionWrapper),
        "closing convolution": None if block is None else block.conv_out,
    }
    choices: dict[str, Choice] = {}
    for kind, layer in layers.items():
        choice = choose(kind, layer, target, disable)
        choice.layers = sum(1 for m in model.modules() if isinstance(m, type(layer))) if kind != "closing convolution" \
            else sum(1 for m in model.modules() if isinstance(m, ESCBlock))
        choices[kind] = choice
    return Plan(choices)


class PreparedModel(nn.Module):
    """A plain ESC model and the implementations it runs on one device and dtype (see the module docstring).

    Attributes the hosts read (``scale``, ``window_size``, ``arbitrary_scale``, ``query``, ...) are the plain
    model's. Inference only: every call runs under ``torch.inference_mode`` (but see :meth:`forward` on dual tensors).
    """

    def __init__(self, model: ESCModelBase, plan: Plan, target: Target) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.target = target

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def report(self) -> list[str]:
        """One line per kind of layer: the implementation chosen, and why each one before it was not."""
        return self.plan.describe()

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """``prepared(x)`` or ``prepared(x, maps)``; an arbitrary-scale model takes ``(lr, coord, cell)`` as the plain
        one does (its encoder through the plan, whole).

        Under forward-mode AD or a ``torch.func`` transform (:func:`esc_runtime.onednn.transformed`: dual tensors
        live on under ``torch.no_grad``) the plain model runs, whole, outside inference mode: its torch operators carry
        the tangents or raise, where the fast paths would silently drop them."""
        if onednn.transformed():
            lte = isinstance(self.model, ESCLTE)
            return self.model(x, *args) if lte else self.model(x)
        with torch.inference_mode():
            if isinstance(self.model, ESCLTE):
                return self.model.query(self.encode(x), *args)
            maps = args[0] if args else WHOLE
            return FORWARDS[type(self.model)](self.model, self.plan, x, maps)

    def encode(self, lr: torch.Tensor, maps: MapRunner = WHOLE) -> tuple[torch.Tensor, ...]:
        """:meth:`esc_arch.ESCLTE.encode` through the plan (arbitrary-scale models)."""
        if onednn.transformed():
            return self.model.encode(lr)
        with torch.inference_mode():
            return self.model.encoded(lr, *lte_encode_maps(self.model, self.plan, lr, maps))

    def upscale_by(self, lr: torch.Tensor, factor: float | None = None, *, size: tuple[int, int] | None = None,
                   max_queries: int = 65536, maps: MapRunner = WHOLE) -> torch.Tensor:
        """:meth:`esc_arch.ESCLTE.upscale_by` with the encoder run through the plan."""
        if onednn.transformed():
            return self.model.upscale_by(lr, factor, size=size, max_queries=max_queries)
        with torch.inference_mode():
            return self.model.upscale_by(lr, factor, size=size, max_queries=max_queries,
                                         encode=lambda image: self.encode(image, maps))

    def train(self, mode: bool = True) -> "PreparedModel":
        if mode:
            raise RuntimeError("a prepared model is for inference; train the plain model (prepared.model before "
                               "prepare, or a new one)")
        return super().train(False)


def prepare(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
            disable: Collection[str] = ()) -> PreparedModel:
    """``model`` ready for inference on ``device`` in ``dtype`` (default: where and what its weights are).

    ``disable``: implementations not to use (e.g. ``("native",)``; "module" cannot be: it is the reference that
    runs anywhere), for comparisons.

    A model already there and in eval mode is used as it is (the caller's model is not changed: nothing is baked);
    otherwise a copy is moved there and fused (:func:`esc_arch.fuse`). A prepared model is returned as it is.
    """
    if isinstance(model, PreparedModel):
        return model
    if not isinstance(model, ESCModelBase):
        raise TypeError(f"esc_runtime.prepare takes an ESC model, not {type(model).__name__}")
    switches.check()  # a misspelt ESC_SR_* is an error, also where its path is passed over for another reason
    first = next(model.parameters())
    device = first.device if device is None else torch.device(device)
    dtype = first.dtype if dtype is None else dtype
    target = Target(device, dtype)
    in_place = all(p.device == device and p.dtype == dtype for p in model.parameters()) \
        and (model.is_fused or not model.training)
    if not in_place:
        model = esc_arch.fuse(copy.deepcopy(model).to(device=device, dtype=dtype))
    chosen = plan(model, target, disable)
    if not in_place and chosen.attention.name == "native":
        for layer in model.modules():  # our copy: the native kernel reads the bias table, the gathered one is unused
            if isinstance(layer, WindowAttention):
                layer.fused_bias = None
    return PreparedModel(model, chosen, target).eval()
