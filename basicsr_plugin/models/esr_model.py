"""``ESRModel``: BasicSR's SRModel with the official ESC test protocol, atomic checkpoints and attention selection.

The name matches the official ESC option files (``model_type: ESRModel``). Training is SRModel's (pixel/perceptual
loss, EMA, optimisers and schedulers from the YAML); what changes:

* ``test()`` reflect-pads the LR to a multiple of the network's window and crops the output (paper protocol);
* checkpoints (``params`` / ``params_ema``) and training states are written atomically;
* ``network_g.attn_type`` defaults to the fastest correct back end for the device;
* ``train.grad_clip`` (optional, a max gradient norm) guards tiny CPU runs against a bad batch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils.registry import MODEL_REGISTRY

from basicsr_plugin.models.mixins import AtomicCheckpointMixin, WindowPaddedTestMixin, fill_default_attention, use_inference_attention


@MODEL_REGISTRY.register()
class ESRModel(AtomicCheckpointMixin, WindowPaddedTestMixin, SRModel):
    """Single-image SR model for the ESC family (see the module docstring)."""

    def __init__(self, opt: dict) -> None:
        defaulted = fill_default_attention(opt)
        super().__init__(opt)
        use_inference_attention(self, defaulted)

    def optimize_parameters(self, current_iter: int) -> None:
        self.optimizer_g.zero_grad(set_to_none=True)
        self.output = self.net_g(self.lq)
        losses = OrderedDict()
        total = 0
        if self.cri_pix:
            losses["l_pix"] = self.cri_pix(self.output, self.gt)
            total = total + losses["l_pix"]
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for name, value in (("l_percep", l_percep), ("l_style", l_style)):
                if value is not None:
                    losses[name] = value
                    total = total + value
        total.backward()
        max_norm = self.opt["train"].get("grad_clip")
        if max_norm:
            torch.nn.utils.clip_grad_norm_(self.net_g.parameters(), float(max_norm))
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(losses)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
