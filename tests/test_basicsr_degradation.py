"""The Real-ESRGAN degradation on CPU filters by FFT: the same numbers as BasicSR's direct ``filter2D``."""

from __future__ import annotations

import pytest
import torch

import basicsr_plugin  # noqa: F401  (applies the patches)
import basicsr.models.realesrnet_model as realesrnet_model
import basicsr.utils.img_process_util as img_process_util
from basicsr_plugin.patches import fft_filter2d

stock_filter2d = img_process_util.filter2D.__wrapped__


@pytest.mark.parametrize("k", [7, 21, 51])
@pytest.mark.parametrize("per_image", [True, False])
def test_fft_filter_equals_the_direct_convolution(k, per_image):
    torch.manual_seed(k)
    img = torch.rand(3, 3, 64, 75)
    kernel = torch.rand(3 if per_image else 1, k, k)
    kernel /= kernel.sum(dim=(-1, -2), keepdim=True)
    expected = stock_filter2d(img, kernel)
    assert torch.allclose(fft_filter2d(img, kernel), expected, atol=2e-6)


def test_the_models_and_usm_sharpening_use_it_on_cpu():
    img = torch.rand(2, 3, 40, 40).permute(0, 1, 3, 2)  # non-contiguous, as DiffJPEG returns it
    kernel = torch.rand(2, 21, 21)
    assert torch.allclose(realesrnet_model.filter2D(img, kernel), stock_filter2d(img.contiguous(), kernel), atol=2e-6)
    sharpened = img_process_util.USMSharp()(img.contiguous())
    assert sharpened.shape == img.shape


def test_an_even_kernel_is_refused_as_before():
    with pytest.raises(ValueError, match="kernel size"):
        fft_filter2d(torch.rand(1, 3, 16, 16), torch.rand(1, 4, 4))
