"""Training throughput of the ESC ×4 recipe, per attention backend: seconds per iteration.

One iteration is what the official recipe does per step (``options/train/ESC_DIV2K_X4.yaml``): forward
of a batch of 64x64 LR patches, L1 loss against the 256x256 HR patches, backward, AdamW
(lr 5e-4, betas (0.9, 0.9), weight decay 0) and the EMA update (decay 0.999).  Data loading is excluded
(random tensors): this measures the model, not the disk.

The recipe's batch is 16 per GPU; on a CPU that is minutes per step, so the CPU default is batch 2 (the
result records the batch used; s/iteration scales about linearly with it).  ``flex`` has no backward on
CPU in torch, so it is measured only on CUDA.

    python -m benchmarks training --batch 2 --runs 3
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from .common import log, parse_args, pick_device, print_json, script_parser
from .models import SCALE
from .peak_memory import measure_case
from .window_attention import sdpa_kernel

LR_PATCH = 64


def workload(case: dict[str, Any], device: torch.device):
    """Child side: one full training step of the recipe (forward, L1, backward, AdamW, EMA)."""
    import esc_arch

    torch.manual_seed(0)
    model = esc_arch.PRESETS[case.get("preset", "esc")](SCALE, attn_type=case["backend"]).to(device).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.9), weight_decay=0.0)
    batch, patch = int(case["batch"]), int(case.get("lr_patch", LR_PATCH))
    lr = torch.rand(batch, 3, patch, patch, device=device)
    hr = torch.rand(batch, 3, patch * SCALE, patch * SCALE, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(lr), hr)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - 0.999)
        return loss

    info = {"preset": case.get("preset", "esc"), "backend": case["backend"], "batch": batch,
            "lr_patch": patch, "scale": SCALE}
    return step, info


def run(
    *, device: torch.device, batch: int, warmup: int, runs: int, backends: tuple[str, ...] | None = None,
    preset: str = "esc", lr_patch: int = LR_PATCH, in_process: bool = False,
) -> dict[str, Any]:
    if backends is None:
        backends = ("sdpa", "naive", "flex") if device.type == "cuda" else ("sdpa", "naive")
    rows = []
    for backend in backends:
        log(f"training step: {preset} x{SCALE} {backend}, batch {batch} of {lr_patch}x{lr_patch}")
        case = {"workload": "benchmarks.training:workload", "preset": preset, "backend": backend, "batch": batch,
                "lr_patch": lr_patch,
                "device": str(device), "warmup": warmup, "runs": runs, "grad": True,
                "threads": torch.get_num_threads()}
        result = measure_case(case, in_process=in_process)
        result.setdefault("backend", backend)
        if backend == "sdpa":
            result["sdpa_kernel"] = sdpa_kernel(device, dim=64, heads=4, window=32, training=True)
        if "error" in result:
            log(f"  FAILED: {result['error']}")
        else:
            result["s_per_iter"] = round(result["median_ms"] / 1e3, 3)
            result["lr_patches_per_s"] = round(batch / result["s_per_iter"], 3)
            log(f"  {result['s_per_iter']:.2f} s/iter, {result['peak_mb']:.0f} MB")
        rows.append(result)
    return {"preset": preset, "batch": batch, "lr_patch": lr_patch, "recipe_batch": 16, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, device="auto", warmup=1, runs=3, threads=None)
    parser.add_argument("--batch", type=int, help="LR patches per step (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--backends", nargs="+")
    args = parse_args(parser, argv)
    device = pick_device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 2)
    return print_json(run(device=device, batch=batch, warmup=args.warmup, runs=args.runs,
                          backends=tuple(args.backends) if args.backends else None))


if __name__ == "__main__":
    raise SystemExit(main())
