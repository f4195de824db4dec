"""Console entry points ``esc-train`` / ``esc-test`` (also used by the repo's ``train.py`` / ``test.py``).

They register the plugin and hand over to BasicSR's own pipelines with ``root_path`` = the current directory, so
``experiments/``, ``results/`` and ``tb_logger/`` are created where the command runs, the same place BasicSR
resolves the YAML's relative dataset paths from. Arguments are BasicSR's: ``-opt FILE [--launcher pytorch]
[--auto_resume] [--debug] [--force_yml key:sub=value ...]``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def _set_argv(argv: Sequence[str] | None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]


def train_main(argv: Sequence[str] | None = None) -> None:
    """Train with a BasicSR option file: ``esc-train -opt options/ESC_x4.yml``."""
    _set_argv(argv)
    import basicsr_plugin  # noqa: F401  (registers archs/datasets/models, applies the CPU/DDP fixes)
    import torch
    from basicsr.train import train_pipeline

    from esc_sr import scopes

    # On a CPU, every training step faults its activations in afresh unless freed memory is kept
    # (esc_sr/heap.py; ESC-tiny, batch 8: 0.74-0.78 against 0.53-0.65 s/iteration).
    try:
        with scopes.batch("cuda" if torch.cuda.is_available() else "cpu"):
            train_pipeline(os.getcwd())
    finally:
        _leave_process_group()


def test_main(argv: Sequence[str] | None = None) -> None:
    """Test with a BasicSR option file: ``esc-test -opt options/test/ESC_x4.yml``."""
    _set_argv(argv)
    import basicsr_plugin  # noqa: F401
    from basicsr.test import test_pipeline

    try:
        test_pipeline(os.getcwd())
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the ``--launcher pytorch`` process group, which BasicSR's pipelines leave behind.

    Left to interpreter shutdown, gloo's worker threads outlive the interpreter and a rank can abort with
    "terminate called without an active exception" (SIGABRT) after a run that finished, failing torchrun.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
