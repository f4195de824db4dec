"""Turn a BasicSR training checkpoint into the embedded default model.

    python scripts/export_default_model.py experiments/ESC_tiny_x4_default_stage2/models/net_g_latest.pth

Writes ``esc_arch/weights/esc_default_x4.safetensors`` (the EMA weights, fp16, with metadata) and,
for measuring exactly what ships, ``experiments/pretrained_models/esc_default_x4_shipped.pth``: the
fp16 weights back in fp32 under ``params_ema``, which
``python test.py -opt options/default_model/test_ESC_tiny_x4.yml`` evaluates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import esc_arch
from esc_arch.checkpoint import DEFAULT_MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="BasicSR net_g_*.pth (params_ema is used)")
    parser.add_argument("--fp32", action="store_true", help="ship fp32 instead of fp16")
    parser.add_argument("--measure-copy", default="experiments/pretrained_models/esc_default_x4_shipped.pth")
    args = parser.parse_args(argv)

    model = esc_arch.load_model(args.checkpoint)  # params_ema preferred
    esc_arch.set_attention_backend(model, "sdpa")
    shipped = esc_arch.save_model(model, DEFAULT_MODEL_FILE, half=not args.fp32)
    reloaded = esc_arch.load_model(shipped)
    copy = Path(args.measure_copy)
    copy.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": reloaded.state_dict()}, copy)
    print(f"wrote {shipped} ({shipped.stat().st_size / 1e6:.2f} MB, {esc_arch.count_parameters(model):,} parameters)")
    print(f"wrote {copy} (the shipped weights, for test.py)")


if __name__ == "__main__":
    main()
