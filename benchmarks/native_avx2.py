"""The AVX2 variant of the native CPU kernels against torch's operators, on this machine (issues 29 and 28).

Which kernel runs by default on which variant is decided by measurement (``esc_runtime.layers.NATIVE_BY_DEFAULT``);
this script measures a variant (the AVX2 one by default, forced with every kernel, as ``ESC_RUNTIME_NATIVE=avx2``
does; ``--variant avx512`` on a CPU with AVX-512) kernel by kernel against what runs otherwise. Each
pair is interleaved in one process (the order alternating per round); medians and minima of the rounds, and each
native output's max abs difference from torch's. ESC x4's shapes at 192x320 (as in benchmarks/README.md, "Native CPU
kernels"), and whole forward passes of ESC x4 at 180x320 prepared by ``esc_runtime`` with and without the native
implementations (random weights).

    python -m benchmarks.native_avx2                   # 2 threads, 7 rounds (3 for the forward passes)
    python -m benchmarks.native_avx2 --threads 1 --rounds 5 --variant avx512
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import esc_arch
import esc_runtime
from esc_arch.attention import relative_position_index
from esc_arch.layers import geometric_ensemble
from esc_runtime import native

HEIGHT, WIDTH = 192, 320


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median, minimum) seconds per side, after one warm-up call each."""
    for call in sides.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def attention(generator: torch.Generator) -> tuple[Callable, Callable]:
    """One ESC layer's window attention (window 32, 4 heads of 16): q/k/v rows in raster order, attended rows out.
    torch: the windows partitioned, sdpa with the gathered bias (computed once, as a prepared model stores it), and
    the rows put back in raster order."""
    heads, ws, b = 4, 32, 1
    qkv = torch.randn(b * HEIGHT * WIDTH, 3 * heads * 16, generator=generator)
    table = torch.randn(heads, (2 * ws - 1) ** 2, generator=generator)
    t, nh, nw = ws * ws, HEIGHT // ws, WIDTH // ws
    bias = table.index_select(1, relative_position_index(ws).reshape(-1)).view(heads, t, t)

    def torch_side() -> torch.Tensor:
        x = qkv.view(b, nh, ws, nw, ws, 3, heads, 16).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b * nh * nw, heads,
                                                                                                t, 16)
        out = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=bias)
        return out.view(b, nh, nw, heads, ws, ws, 16).permute(0, 1, 4, 2, 5, 3, 6).reshape(b * HEIGHT * WIDTH, -1)

    return torch_side, lambda: native.window_attention(qkv, table, batch=b, height=HEIGHT, width=WIDTH, heads=heads,
                                                       window=ws)


def ffn(generator: torch.Generator, hidden: int) -> tuple[Callable, Callable]:
    """ESC's ConvFFN, 64 -> hidden -> 64 channels, on a channels-last map (torch: oneDNN convolutions, GELUs)."""
    layers = [torch.nn.Conv2d(64, hidden, 1), torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
              torch.nn.Conv2d(hidden, 64, 1)]
    for layer in layers:
        layer.to(memory_format=torch.channels_last)
    x = torch.randn(1, 64, HEIGHT, WIDTH, generator=generator).contiguous(memory_format=torch.channels_last)

    def torch_side() -> torch.Tensor:
        h = F.gelu(layers[0](x))
        return layers[2](F.gelu(layers[1](h)) + h)

    return torch_side, lambda: native.conv_ffn(x, *layers)


def correlation(generator: torch.Generator) -> tuple[Callable, Callable]:
    """ESC's 13x13 shared kernel (16 channels) plus the per-sample dynamic 3x3, on the first channels of a 64-channel
    channels-last map (torch: oneDNN's direct convolutions)."""
    kernel = geometric_ensemble(torch.randn(16, 16, 13, 13, generator=generator) * 0.1)
    dynamic = torch.randn(1, 16, 3, 3, generator=generator)
    x = torch.randn(1, 64, HEIGHT, WIDTH, generator=generator).contiguous(memory_format=torch.channels_last)
    prepared, out = native.SymmetricKernel(kernel), torch.empty_like(x)

    def torch_side() -> torch.Tensor:
        part = x[:, :16]
        return F.conv2d(part, kernel, padding=6) + F.conv2d(part, dynamic.view(16, 1, 3, 3), padding=1, groups=16)

    def native_side() -> torch.Tensor:
        prepared.correlate(x[:, :16], dynamic, out=out[:, :16])
        return out[:, :16]

    return torch_side, native_side


def projection(generator: torch.Generator) -> tuple[Callable, Callable]:
    """``to_qkv`` (64 -> 192) with the block's LayerNorm in front, on the map's rows of pixels."""
    x = torch.randn(HEIGHT * WIDTH, 64, generator=generator)
    weight, bias = torch.randn(192, 64, generator=generator) * 0.1, torch.randn(192, generator=generator)
    norm = torch.nn.LayerNorm(64)
    return (lambda: F.linear(F.layer_norm(x, (64,), norm.weight, norm.bias, norm.eps), weight, bias),
            lambda: native.linear_rows(x, weight, bias, norm=norm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="avx2", choices=list(native.VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--forward-rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    status = native.select(args.variant)
    if native.variant() != args.variant:
        raise SystemExit(f"the {args.variant} variant does not run here: {status}")
    print(f"# {cpu_model()}, torch {torch.__version__}, {args.threads} threads, {status}")
    print("| what | torch (ms, median / min) | native (ms, median / min) | native / torch | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    cases = [("window attention, one layer (window 32, 4 heads)", attention),
             ("ConvFFN 64 -> 80 -> 64", lambda g: ffn(g, 80)), ("ConvFFN 64 -> 128 -> 64", lambda g: ffn(g, 128)),
             ("13x13 correlation + dynamic 3x3, 16 channels", correlation),
             ("to_qkv 64 -> 192 with its LayerNorm", projection)]
    with torch.inference_mode():
        for name, make in cases:
            torch_side, native_side = make(generator)
            times = interleaved({"torch": torch_side, "native": native_side}, args.rounds)
            diff = (torch_side() - native_side()).abs().max().item()
            (tm, tn), (nm, nn) = times["torch"], times["native"]
            print(f"| {name}, {HEIGHT}x{WIDTH} | {tm * 1e3:.1f} / {tn * 1e3:.1f} | {nm * 1e3:.1f} / {nn * 1e3:.1f} "
                  f"| {nm / tm:.2f}x | {diff:.1e} |", flush=True)

        model = esc_arch.PRESETS["esc"](4).eval()
        on, off = esc_runtime.prepare(model), esc_runtime.prepare(model, disable=("native",))
        lr = torch.rand(1, 3, 180, 320, generator=generator)
        times = interleaved({"torch": lambda: off(lr), "native": lambda: on(lr)}, args.forward_rounds)
        diff = (on(lr) - off(lr)).abs().max().item()
        (tm, tn), (nm, nn) = times["torch"], times["native"]
        print(f"| ESC x4 forward, 180x320 (native: {'; '.join(on.report())}) | {tm * 1e3:.0f} / {tn * 1e3:.0f} | "
              f"{nm * 1e3:.0f} / {nn * 1e3:.0f} | {nm / tm:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
