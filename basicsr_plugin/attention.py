"""Which esc_arch attention back end the plugin uses when an option file does not set ``attn_type``.

Measured for the ESC x4 recipe network on the 2-core CPU of docs/training.md (training step, batch 2 of 64x64):
naive 5.57 vs sdpa 6.02 CPU-seconds per step (one thread), 108.9 vs 110.1 s wall (two threads, shared machine).
The CPU flash kernel rejects the trainable relative-position bias, so SDPA runs its math kernel while training on
CPU and gains nothing over the explicit computation; ``flex`` cannot train on CPU at all (no backward there).
For inference (validation, the EMA copy, test.py) SDPA runs the CPU flash kernel, and on CUDA torch picks a fused
kernel: ``sdpa`` there.
"""

from __future__ import annotations


def default_attention_backend(device: str, training: bool) -> str:
    """The fastest correct back end for ``device`` ('cpu' or 'cuda') when training or running inference."""
    if device == "cpu" and training:
        return "naive"
    return "sdpa"
