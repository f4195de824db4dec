"""Models registered into BasicSR's MODEL_REGISTRY."""

from basicsr_plugin.models import arbitrary_scale_model, esr_model, realesrgan_models  # noqa: F401

__all__ = ["arbitrary_scale_model", "esr_model", "realesrgan_models"]
