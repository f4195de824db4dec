"""Datasets registered into BasicSR's DATASET_REGISTRY."""

from basicsr_plugin.data import arbitrary_scale_dataset, downsample_dataset, realesrgan_dataset  # noqa: F401

__all__ = ["arbitrary_scale_dataset", "downsample_dataset", "realesrgan_dataset"]
