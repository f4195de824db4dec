"""ESC's shared large-kernel convolution as an overlap-save FFT, for CPU inference.

Why: ESC's partial convolution is a dense ``pdim -> pdim`` 13x13 correlation plus a per-sample 3x3 depthwise one.
In the frequency domain the same correlation is a few FFTs and one ``pdim x pdim`` complex channel mix per
frequency; cut into ``n x n`` blocks that overlap by the kernel's size less one (overlap-save), the kernel's
spectrum is ``n x n``, computed once per forward pass and shared by every block of every layer, and the dynamic
3x3 kernel is a diagonal mix on the same spectra, so one pass does both convolutions. Speed and accuracy against
the direct convolutions: ``benchmarks/README.md``, "Large kernel by FFT".

The runtime chooses it (``esc_runtime.layers``) for float32 CPU inference where the native correlation is not
built, for kernels of at least :data:`MIN_KERNEL` taps and maps of at least :data:`MIN_PIXELS` (smaller tiles of a
layer-streamed pass run direct); ``ESC_SR_FFT=0`` turns it off.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import onednn, switches
from esc_arch.layers import per_sample_depthwise_conv

__all__ = ["MIN_KERNEL", "MIN_PIXELS", "enabled", "applies", "block_size", "SpectralKernel", "prepare"]

#: Smaller kernels stay direct: below this the FFT does not repay itself (benchmarks/README.md).
MIN_KERNEL = 11

#: Maps (or tiles) of fewer pixels run direct: the FFT's fixed costs make it slower there (benchmarks/README.md).
MIN_PIXELS = 128 * 128


@functools.lru_cache(maxsize=1)
def enabled() -> bool:
    """Whether the environment allows this path (``ESC_SR_FFT=0``, or another off value, turns it off)."""
    return switches.enabled("ESC_SR_FFT")


def applies(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether the large-kernel convolutions of a forward pass on ``x`` take the FFT path (the module docstring)."""
    if onednn.tracing() or onednn.transformed():  # first: under tracing, shapes are tensors
        return False
    return kernel.shape[-1] >= MIN_KERNEL and x.device.type == "cpu" and x.dtype == torch.float32 \
        and kernel.dtype == torch.float32 and not torch.is_grad_enabled() and enabled()


def block_size(kernel_size: int) -> int:
    """The FFT block side: the smallest power of two of at least 64 and four times the kernel's overlap (64 beat
    32 and 128 on ESC's channel counts: benchmarks/README.md)."""
    size = 64
    while size < 4 * (kernel_size - 1):
        size *= 2
    return size


def _channel_mix(spectrum: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., out, in)`` matrices as real ``(..., 2 out, 2 in)`` ones acting on interleaved (re, im) pairs.

    (a + ib)(x + iy) is [[a, -b], [b, a]] applied to (x, y): one real batched matmul, which torch hands to BLAS in
    one call (its complex bmm loops over the batch).
    """
    a, b = spectrum.real, spectrum.imag
    *batch, o, i = spectrum.shape
    return torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -3).reshape(*batch, 2 * o, 2 * i)


class SpectralKernel:
    """A correlation kernel ``(out, in, k, k)`` with its overlap-save spectrum, for one forward pass.

    Built once per forward pass (:func:`prepare`); ``correlate`` does what ``F.conv2d(x, kernel, padding=k // 2)``
    plus a per-sample depthwise 3x3 convolution do.
    """

    def __init__(self, kernel: torch.Tensor) -> None:
        self.kernel = kernel
        out_channels, _, k, _ = kernel.shape
        self.block = block_size(k)
        # Correlation is convolution with the flipped kernel; a block's valid outputs then start at row/column k - 1.
        spectrum = torch.fft.rfft2(kernel.flip(-2, -1), s=(self.block, self.block))  # (out, in, n, freqs)
        self.mix = _channel_mix(spectrum.permute(2, 3, 0, 1)).reshape(-1, 2 * out_channels, 2 * out_channels)

    def _dynamic_spectrum(self, dynamic: torch.Tensor) -> torch.Tensor:
        """``(batch, freqs, 1, c)`` complex: each sample's depthwise 3x3 kernel, centred as the large kernel is."""
        n, k = self.block, self.kernel.shape[-1]
        batch, c = dynamic.shape[:2]
        centre = (k - 3) // 2  # the 3x3 kernel (padding 1) shares the large kernel's centre (padding k // 2)
        embedded = dynamic.new_zeros(batch, c, k, k)
        embedded[:, :, centre:centre + 3, centre:centre + 3] = dynamic
        spectrum = torch.fft.rfft2(embedded.flip(-2, -1), s=(n, n))  # (batch, c, n, freqs)
        return spectrum.permute(0, 2, 3, 1).reshape(batch, -1, 1, c)

    def correlate(self, x: torch.Tensor, dynamic: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        """Write the correlation of ``x`` (``(b, in, h, w)``, any strides) plus each sample's depthwise 3x3 ``dynamic``
        kernel (``(b, in, 3, 3)``, padding 1) into ``out`` (``(b, out, h, w)``)."""
        b, c, h, w = x.shape
        n, k = self.block, self.kernel.shape[-1]
        if h * w < MIN_PIXELS:
            return torch.add(F.conv2d(x, self.kernel, padding=k // 2), per_sample_depthwise_conv(x, dynamic, padding=1),
                             out=out)
        valid = n - (k - 1)  # outputs per block side
        rows, cols, freqs = -(-h // valid), -(-w // valid), n * (n // 2 + 1)

        r = k // 2
        padded = x.new_zeros(b, rows * valid + k - 1, cols * valid + k - 1, c)  # channels last: copies stay linear
        padded[:, r:r + h, r:r + w] = x.permute(0, 2, 3, 1)
        # The blocks as (b, n, n, rows, cols, c), the offsets within a block outside the block index and the channels:
        # the FFTs run over axes 1 and 2 with everything else as their batch, so the spectra come out as the channel
        # mix reads them, (b, frequencies, blocks, 2c), and the inverse FFT takes the mix's output as it lies
        # (0.91x the time of transforming (b, rows, cols, n, n, c) blocks over their last axes but one).
        bs, hs, ws, cs = padded.stride()
        blocks = padded.as_strided((b, n, n, rows, cols, c), (bs, hs, ws, valid * hs, valid * ws, cs))
        spectra = torch.view_as_real(torch.fft.rfft2(blocks, dim=(1, 2)))  # (b, n, n//2+1, rows, cols, c, 2)
        spectra = spectra.reshape(b, freqs, rows * cols, 2 * c)
        mixed = torch.matmul(spectra, self.mix.transpose(-2, -1))  # (b, freqs, blocks, 2c)
        # the depthwise kernel is a diagonal mix: one complex multiply-add per channel
        mixed_c = torch.view_as_complex(mixed.view(b, freqs, rows * cols, c, 2))
        mixed_c.addcmul_(torch.view_as_complex(spectra.unflatten(-1, (c, 2))), self._dynamic_spectrum(dynamic))
        mixed_c = mixed_c.view(b, n, n // 2 + 1, rows, cols, c)
        result = torch.fft.irfft2(mixed_c, s=(n, n), dim=(1, 2))[:, k - 1:, k - 1:]  # (b, v, v, rows, cols, c)
        result = result.permute(0, 3, 1, 4, 2, 5).reshape(b, rows * valid, cols * valid, c)[:, :h, :w]
        out.permute(0, 2, 3, 1).copy_(result)
        return out


def prepare(kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor | SpectralKernel:
    """The large kernel as the blocks of a forward pass on ``x`` use it: with its spectrum where :func:`applies` and
    the map has at least :data:`MIN_PIXELS` (layer-streamed tiles of fewer run direct, in :meth:`~SpectralKernel.correlate`)."""
    return SpectralKernel(kernel) if applies(x, kernel) and x.shape[-2] * x.shape[-1] >= MIN_PIXELS else kernel
