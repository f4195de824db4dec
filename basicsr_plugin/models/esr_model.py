"""``ESRModel``: BasicSR's SRModel with the official ESC test protocol, atomic checkpoints and attention selection.

The name matches the official ESC option files (``model_type: ESRModel``). Training is SRModel's (pixel/perceptual
loss, EMA, optimisers and schedulers from the YAML); what changes:

* ``test()`` reflect-pads the LR to a multiple of the network's window and crops the output (paper protocol);
* checkpoints (``params`` / ``params_ema``) and training states are written atomically;
* ``network_g.attn_type`` defaults to the fastest correct back end for the device;
* ``train.grad_clip`` (optional, a max gradient norm) guards tiny CPU runs against a bad batch;
* ``val.keep_best: psnr`` (optional) saves ``net_g_best.pth`` (``params`` + ``params_ema``) whenever validation
  beats the best value so far, recorded in ``net_g_best.json`` so that a resumed run keeps comparing with it;
* ``path.pretrain_network_g`` may be a ``.safetensors`` file (read by ``esc_arch``, e.g. the embedded default model).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from basicsr_plugin.checkpoint_io import atomic_write_text
from basicsr_plugin.models.mixins import (
    AtomicCheckpointMixin, SafetensorsPretrainMixin, WindowPaddedTestMixin, fill_default_attention, use_inference_attention,
)


@MODEL_REGISTRY.register()
class ESRModel(AtomicCheckpointMixin, SafetensorsPretrainMixin, WindowPaddedTestMixin, SRModel):
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

    def _update_best_metric_result(self, dataset_name, metric, val, current_iter):
        super()._update_best_metric_result(dataset_name, metric, val, current_iter)
        if self.opt.get("is_train") and self.opt.get("val", {}).get("keep_best") == metric:
            self._keep_if_best(metric, float(val), current_iter)

    def _keep_if_best(self, metric: str, value: float, current_iter: int) -> None:
        record_path = os.path.join(self.opt["path"]["models"], "net_g_best.json")
        if os.path.exists(record_path):
            with open(record_path, encoding="utf-8") as handle:
                if json.load(handle)[metric] >= value:
                    return
        nets, keys = [self.net_g], ["params"]
        if hasattr(self, "net_g_ema"):
            nets, keys = [self.net_g, self.net_g_ema], ["params", "params_ema"]
        self.save_network(nets, "net_g", "best", param_key=keys)
        atomic_write_text(record_path, json.dumps({metric: value, "iter": current_iter}) + "\n")
        get_root_logger().info(f"New best {metric} {value:.4f} at iter {current_iter}: saved net_g_best.pth")
