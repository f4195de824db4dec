"""The memory estimate is read off the model's layers (esc_runtime.footprint); benchmarks/memory_estimate.py checks it
against measured peaks (1.16-1.66x of them for ten variants). These tests pin what it must see."""

from __future__ import annotations

import torch

import esc_arch
from esc_runtime.footprint import activation_elements_per_pixel
from esc_sr import memory


def test_a_nearest_conv_head_is_counted_at_the_output_resolution():
    real = esc_arch.esc_real(4)  # its last convolutions run on 64 channels at 16x the LR pixels
    assert activation_elements_per_pixel(real) >= 2 * 64 * 16
    assert activation_elements_per_pixel(real) > 2 * activation_elements_per_pixel(esc_arch.esc(4))


def test_a_pixel_unshuffled_trunk_costs_a_quarter_per_input_pixel():
    plain = esc_arch.esc_realm(4, upsampler="pixelshuffle")
    unshuffled = esc_arch.esc_realm(2, upsampler="pixelshuffle")  # trunk on half-size maps, then an x4 head
    assert unshuffled.unshuffle == 2
    assert activation_elements_per_pixel(unshuffled) == activation_elements_per_pixel(plain) / 4


def test_the_naive_kernel_adds_every_windows_score_matrix():
    sdpa, naive = esc_arch.esc(4), esc_arch.esc(4, attn_type="naive")
    extra = activation_elements_per_pixel(naive) - activation_elements_per_pixel(sdpa)
    assert extra >= 2 * 4 * 32 * 32  # scores and softmax: heads x window^2 per pixel


def test_half_precision_halves_the_estimate():
    model = esc_arch.esc_light(2)
    assert memory.bytes_per_input_pixel(model, torch.float16) * 2 == memory.bytes_per_input_pixel(model, torch.float32)
