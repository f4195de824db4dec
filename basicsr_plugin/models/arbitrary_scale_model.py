"""``ArbitraryScaleModel``: trains ESC + LTE (``network_g.type: ESCLTE``) on sampled queries at random scales.

Training: the network predicts RGB at the dataset's query coordinates (``lq``, ``coord``, ``cell`` -> (B, Q, 3)) and
the pixel loss compares them with the HR pixels there; EMA, optimisers and schedulers as in SRModel.
Validation: each validation set has one ``scale`` (e.g. 2, and 6 outside the training range); the whole image is
rendered with ``upscale_by`` in chunks of ``val.max_queries`` queries, and metrics whose ``crop_border`` is ``auto``
(or missing) shave ceil(scale) pixels, the LTE benchmark convention.
"""

from __future__ import annotations

import copy
import math

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils.registry import MODEL_REGISTRY

from basicsr_plugin.models.mixins import (
    AtomicCheckpointMixin, fill_default_attention, use_inference_attention,
)


@MODEL_REGISTRY.register()
class ArbitraryScaleModel(AtomicCheckpointMixin, SRModel):
    """Arbitrary-scale SR model for ESCLTE (see the module docstring)."""

    def __init__(self, opt: dict) -> None:
        defaulted = fill_default_attention(opt)
        super().__init__(opt)
        use_inference_attention(self, defaulted)

    def feed_data(self, data: dict) -> None:
        self.lq = data["lq"].to(self.device)
        self.gt = data["gt"].to(self.device) if "gt" in data else None
        self.coord = data["coord"].to(self.device) if "coord" in data else None
        self.cell = data["cell"].to(self.device) if "cell" in data else None
        scale = data.get("scale")
        self.current_scale = float(scale.reshape(-1)[0]) if scale is not None else float(self.opt.get("scale", 4))
        if self.gt is None:
            del self.gt

    def optimize_parameters(self, current_iter: int) -> None:
        self.optimizer_g.zero_grad(set_to_none=True)
        self.output = self.net_g(self.lq, self.coord, self.cell)
        l_pix = self.cri_pix(self.output, self.gt)
        l_pix.backward()
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict({"l_pix": l_pix})
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def test(self) -> None:
        net = self.get_bare_model(self.net_g_ema if hasattr(self, "net_g_ema") else self.net_g)
        was_training = net.training
        net.eval()
        max_queries = int(self.opt.get("val", {}).get("max_queries", 65536))
        target = tuple(self.gt.shape[-2:]) if hasattr(self, "gt") and self.gt is not None and self.gt.dim() == 4 else None
        with torch.no_grad():
            self.output = net.upscale_by(self.lq, self.current_scale, size=target, max_queries=max_queries)
        net.train(was_training)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        scale = float(getattr(dataloader.dataset, "scale", self.opt.get("scale", 4)))
        metrics = self.opt["val"].get("metrics")
        if not metrics:
            return super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        saved = copy.deepcopy(metrics)
        for metric in metrics.values():
            if metric.get("crop_border", "auto") == "auto":
                metric["crop_border"] = math.ceil(scale)
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            self.opt["val"]["metrics"] = saved
