"""Which esc_arch attention back end the plugin uses when an option file does not set ``attn_type``.

Measured for the ESC x4 recipe (see docs/training.md):

* CPU training: ``sdpa``. The CPU flash kernel rejects the trainable relative-position bias (it requires grad), so
  torch runs SDPA's math kernel; ``flex`` cannot train on CPU at all (no backward).
* CPU/GPU inference and GPU training: ``sdpa`` lets torch pick its fused kernel.
"""

from __future__ import annotations


def default_attention_backend(device: str, training: bool) -> str:
    """The fastest correct back end for ``device`` ('cpu' or 'cuda') in training or inference."""
    del device, training  # the same answer everywhere today; kept as a function so measurements can refine it
    return "sdpa"
