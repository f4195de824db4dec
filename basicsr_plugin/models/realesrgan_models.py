"""Device-aware Real-ESRGAN models for ESC-Real: ``ESCRealMSEModel`` (L1 stage) and ``ESCRealGANModel``.

They are BasicSR's ``RealESRNetModel`` / ``RealESRGANModel`` (second-order degradation synthesised per batch, the
training-pair queue, USM-sharpened targets, GAN + perceptual losses) with what stops those from running on CPU removed:
stock ``__init__`` moves DiffJPEG and USMSharp with ``.cuda()`` and the queue is allocated with ``.cuda()``; here both
follow ``self.device``. Plus the plugin's window-padded ``test()``, atomic checkpoints and attention default.

``RealHATMSEModel`` / ``RealHATGANModel`` are aliases under the names the official ESC option files use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from basicsr.models.realesrgan_model import RealESRGANModel
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.models.sr_model import SRModel
from basicsr.models.srgan_model import SRGANModel
from basicsr.utils import DiffJPEG, USMSharp
from basicsr.utils.registry import MODEL_REGISTRY

from basicsr_plugin.models.mixins import (
    AtomicCheckpointMixin, SafetensorsPretrainMixin, WindowPaddedTestMixin, fill_default_attention, use_inference_attention,
)


class _DeviceAwareDegradationMixin:
    """Builds the degradation helpers on ``self.device`` and pre-allocates the pair queue there."""

    def _init_degradation(self, opt: dict) -> None:
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)
        self.usm_sharpener = USMSharp().to(self.device)
        self.queue_size = opt.get("queue_size", 180)

    def feed_data(self, data: dict) -> None:
        if self.is_train and "kernel1" in data:
            self._check_crop_size(tuple(data["gt"].shape[-2:]), int(data["kernel1"].shape[-1]))
        super().feed_data(data)
        if self.is_train and "kernel1" in data and float(self.opt.get("clean_prob", 0)) > 0:
            self._mix_clean_pairs(float(self.opt["clean_prob"]))

    @torch.no_grad()
    def _mix_clean_pairs(self, prob: float) -> None:
        """Option ``clean_prob`` (not in stock BasicSR): replace that share of the batch's inputs by the plain
        antialiased bicubic /scale of their targets, so one model also serves clean downscales, which the
        second-order pipeline (always blurred, noised and JPEG-compressed) never produces."""
        chosen = torch.rand(self.lq.size(0), device=self.lq.device) < prob
        if chosen.any():
            clean = F.interpolate(self.gt[chosen], size=self.lq.shape[-2:], mode="bicubic", antialias=True)
            self.lq[chosen] = torch.clamp((clean * 255.0).round(), 0, 255) / 255.0

    def _check_crop_size(self, size: tuple[int, int], kernel: int) -> None:
        """The first-order downscale can shrink the GT to resize_range[0] of its size, and the 21-tap blurs then
        need more than kernel // 2 pixels (reflect padding): refuse crops that are too small with a clear message."""
        smallest = int(min(size) * min(1.0, float(self.opt.get("resize_range", [0.15, 1.5])[0])))
        if smallest <= kernel // 2:
            needed = int((kernel // 2 + 1) / min(1.0, float(self.opt.get("resize_range", [0.15, 1.5])[0]))) + 1
            raise ValueError(
                f"GT crop {size[0]}x{size[1]} is too small for the Real-ESRGAN degradation: resize_range starts at "
                f"{self.opt.get('resize_range', [0.15])[0]}, leaving {smallest} px for a {kernel}x{kernel} blur; "
                f"set the dataset's crop_pad_size to at least {needed}")

    @torch.no_grad()
    def _dequeue_and_enqueue(self) -> None:
        if not hasattr(self, "queue_lr"):
            b = self.lq.size(0)
            if self.queue_size % b:
                raise ValueError(f"queue_size {self.queue_size} is not divisible by the batch size {b}")
            self.queue_lr = torch.zeros(self.queue_size, *self.lq.shape[1:], device=self.device)
            self.queue_gt = torch.zeros(self.queue_size, *self.gt.shape[1:], device=self.device)
            self.queue_ptr = 0
        super()._dequeue_and_enqueue()  # stock logic; its .cuda() allocation is skipped because the queue exists


@MODEL_REGISTRY.register()
class ESCRealMSEModel(AtomicCheckpointMixin, SafetensorsPretrainMixin, WindowPaddedTestMixin, _DeviceAwareDegradationMixin, RealESRNetModel):
    """Real-ESRGAN "Net" stage (pixel loss only) on any device."""

    def __init__(self, opt: dict) -> None:
        defaulted = fill_default_attention(opt)
        SRModel.__init__(self, opt)  # skip RealESRNetModel.__init__, whose only extra work is the .cuda() calls
        self._init_degradation(opt)
        use_inference_attention(self, defaulted)


@MODEL_REGISTRY.register()
class ESCRealGANModel(AtomicCheckpointMixin, SafetensorsPretrainMixin, WindowPaddedTestMixin, _DeviceAwareDegradationMixin, RealESRGANModel):
    """Real-ESRGAN GAN stage (pixel + perceptual + GAN losses, UNet discriminator) on any device."""

    def __init__(self, opt: dict) -> None:
        defaulted = fill_default_attention(opt)
        SRGANModel.__init__(self, opt)  # skip RealESRGANModel.__init__ (.cuda() calls only)
        self._init_degradation(opt)
        use_inference_attention(self, defaulted)


@MODEL_REGISTRY.register()
class RealHATMSEModel(ESCRealMSEModel):
    """Alias of :class:`ESCRealMSEModel` under the official ESC option-file name."""


@MODEL_REGISTRY.register()
class RealHATGANModel(ESCRealGANModel):
    """Alias of :class:`ESCRealGANModel` under the official ESC option-file name."""
