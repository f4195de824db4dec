"""GPU readiness: one command that checks and measures everything CUDA in ESC-SR, in at most 8 minutes.

    python -m benchmarks gpu_check --out benchmarks/results           # on a GPU
    python -m benchmarks gpu_check --smoke --out /tmp/gpucheck       # on a CPU: every section, tiny sizes
    python -m benchmarks gpu_check --pack-golden .gpu_golden         # golden fixtures that fit a device upload

It writes ``gpu-<machine>.json`` and ``gpu-<machine>.md`` into ``--out`` (suffixed ``-smoke`` / ``-partial`` for
``--smoke`` / ``--only``), both rewritten after every section, and the workers' stderr to ``gpu-<machine>.log``.
The sections (:data:`SECTIONS`, run in this order):

* ``environment``       torch / CUDA / cuDNN / Triton versions, the GPU, the SDPA and TF32 switches;
* ``golden``            the test suite's golden tests on the device (``pytest --device cuda -m device
                        tests/test_golden.py``): every case per attention backend, fp32 with TF32 off, 1e-4;
* ``attention_kernels`` which SDPA kernel runs per backend, dtype, inference and training: the probe of
                        :func:`esc_runtime.attention_kernel` and the operators a real forward pass dispatches;
* ``sdpa_kernels``      every SDPA kernel forced in turn on ESC's attention shape with its float bias:
                        latency, error against the math kernel, and which one torch picks by default;
* ``flex_compiled``     whether torch.compile of flex_attention builds for each ESC attention shape and
                        dtype (no eager fallback), its error against naive, its latency against sdpa;
* ``precision``         the suite's half-precision tests on the device (tests/test_spandrel_dtypes.py: every
                        architecture that claims fp16 / bf16 stays close to fp32; tests/test_engine.py: upscale);
* ``training_step``     the suite's training tests on the device (tests/test_models.py: forward + backward per
                        backend, gradients reach the attention bias and the large kernel);
* ``window_attention``  the WindowAttention layer alone at window 32: naive vs sdpa vs flex (paper: 16x
                        time, 12.2x memory), 100 warm-ups and 100 timed runs;
* ``latency``           the paper's protocol (``scripts/test_direct_metrics.py``): batch 1, 1280x720 output
                        (LR 360x640, 240x426, 180x320 for x2/x3/x4, i.e. 720//s x 1280//s), 100 warm-ups,
                        100 runs timed with CUDA events, ``max_memory_allocated`` after
                        ``reset_peak_memory_stats``; ESC / ESC-light / ESC-FP per backend while time lasts;
* ``auto_tile``         ``esc_sr.upscale(tile='auto')`` on a 4K image against the untiled run (within 1/255),
                        layer-streamed 512 px tiles (time and peak against untiled),
                        then out-of-memory halving under a forced memory limit
                        (``torch.cuda.set_per_process_memory_fraction``).

The three suite sections run pytest in a subprocess (:mod:`benchmarks.suite`) and record each test's outcome and
seconds; they stop it before the section's cap or the budget runs out, and keep the tests it finished.

Robustness: the sections run in a worker process; a section that raises is recorded and the next one runs; a
worker that crashes (a segfault in a compiler, a sticky CUDA error) or a section that runs past its cap is
recorded too, and a fresh worker goes on with the sections left. ``--budget-s`` (default 420) is the time the
whole run may take: heavy sections that no longer fit are skipped, and the results say so; at the budget plus a
minute the worker is stopped. ``--smoke`` runs every section on the smallest case on the CPU in a few minutes
(``tests/test_gpu_check.py``); without ``--smoke`` the script refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from esc_sr.facts import ATTENTION_BACKENDS

from . import suite
from .common import GOLDEN_DIR, MIB, REPO_ROOT, RESULTS_DIR, log, machine_info, machine_slug, time_callable, time_once
from .common import write_json_atomic, write_text_atomic

DEFAULT_GOLDEN = GOLDEN_DIR  # as tests/golden.py
# The sections that are the test suite's own tests on the device (tests/conftest.py: --device, -m device).
SUITE_TESTS = {
    "golden": ("tests/test_golden.py",),  # every case per backend, fp32, TF32 off, within 1e-4
    "precision": ("tests/test_spandrel_dtypes.py", "tests/test_engine.py"),  # fp16 / bf16 against fp32
    "training_step": ("tests/test_models.py",),  # forward + backward per backend, gradients reach the weights
}
CHELSEA = REPO_ROOT / "esc_sr" / "assets" / "chelsea_256x320.png"  # a photo that travels with the repository
DEFAULT_BUDGET_S = 420.0
HARD_GRACE_S = 60.0  # past the budget, the running worker is stopped
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Table 2 of the paper (GPU, fp32, 1280x720 output): latency ms, memory MB.
PAPER_TABLE2 = {
    ("esc", 2): (120.9, 831), ("esc", 3): (41.4, 385), ("esc", 4): (21.9, 215),
    ("esc_light", 2): (73.2, 830), ("esc_light", 3): (25.2, 384), ("esc_light", 4): (13.3, 213),
    ("esc_fp", 2): (94.3, 627), ("esc_fp", 3): (34.8, 291), ("esc_fp", 4): (21.7, 158),
}
PAPER_WINDOW_ATTENTION = {"latency_ratio": 16.0, "memory_ratio": 12.2}
# Golden checkpoints standing in for trained weights (every path active: the tiling's global pools matter).
GOLDEN_WEIGHTS = {("esc", 4): "esc_x4", ("esc_light", 4): "esc_light_x4_converted", ("esc_fp", 4): "esc_fp_x4"}
# Not packed for the device: the two largest, each covered by a neosr case of the same class at half the size.
PACK_SKIP = {"esc_real_x4": "neosr_esc_real_nearestconv_x4", "esc_real_dysample_x4": "neosr_esc_real_dysample_x4"}


def paper_lr_size(scale: int) -> tuple[int, int]:
    """LR (height, width) of the paper's 1280x720 protocol: ``(720 // s, 1280 // s)``; x3 is 240x426."""
    return 720 // scale, 1280 // scale


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Every size and count of a run: the full GPU plan, or the smoke plan (CPU, smallest cases)."""

    name: str
    suite_keywords: dict[str, str]  # pytest -k of a suite section (SUITE_TESTS); none: all its device tests
    dtypes: tuple[str, ...]
    kernel_presets: tuple[str, ...]
    kernel_model: tuple[str, tuple[int, int]]  # preset, LR size of the real forward pass that is profiled
    kernel_model_dtypes: tuple[str, ...]  # its inference dtypes (each is one more flex compilation)
    sdpa_shape: tuple[int, int, int, int]  # windows, heads, tokens, head dim
    sdpa_runs: tuple[int, int]  # warm-up, timed
    flex_configs: tuple[tuple[str, int, int, int, tuple[int, int], tuple[str, ...]], ...]
    flex_runs: tuple[int, int]
    window_attention: dict[str, Any]
    latency_presets: tuple[str, ...]
    latency_sizes: dict[int, tuple[int, int]]
    latency_runs: tuple[int, int]
    auto_tile: dict[str, Any]


def make_plan(smoke: bool) -> Plan:
    if smoke:  # one attention shape (2 heads x 256 tokens x 16) everywhere: one flex compilation on the CPU
        return Plan(
            name="smoke",
            suite_keywords={"golden": "escrealm_conv_x1_unshuffle",
                            "precision": "escrealm_nearestconv_x2_unshuffle or half_precision"},
            dtypes=("fp32", "fp16", "bf16"), kernel_presets=("esc_tiny",), kernel_model=("esc_tiny", (32, 32)),
            kernel_model_dtypes=("fp32",), sdpa_shape=(4, 2, 256, 16), sdpa_runs=(1, 2),
            flex_configs=(("esc_tiny", 32, 2, 16, (32, 32), ("fp32",)),), flex_runs=(1, 2),
            window_attention=dict(dim=32, heads=2, window=16, size=(32, 32), runs=(1, 2),
                                  rows=(("naive", "fp32"), ("sdpa", "fp32"), ("flex", "fp32"))),
            latency_presets=("esc_tiny",), latency_sizes={4: (16, 16)}, latency_runs=(1, 2),
            auto_tile=dict(model="default", size=(256, 256), overlap=None, simulated_limit_px=40000),
        )
    return Plan(
        name="full", suite_keywords={},
        dtypes=("fp32", "fp16", "bf16"), kernel_presets=("esc", "esc_fp", "esc_xl", "esc_tiny"),
        kernel_model=("esc", (64, 64)), kernel_model_dtypes=("fp32", "fp16", "bf16"), sdpa_shape=(60, 4, 1024, 16), sdpa_runs=(10, 30),  # ESC x4 at 180x320
        flex_configs=(
            ("esc", 64, 4, 32, (192, 320), ("fp32", "fp16", "bf16")),
            ("esc_fp", 48, 3, 32, (192, 320), ("fp32",)),
            ("esc_xl", 192, 12, 48, (192, 336), ("fp32",)),
            ("esc_tiny", 32, 2, 16, (192, 320), ("fp32",)),
        ),
        flex_runs=(10, 50),
        window_attention=dict(dim=64, heads=4, window=32, size=(256, 256), runs=(100, 100),
                              rows=(("naive", "fp32"), ("sdpa", "fp32"), ("flex", "fp32"), ("sdpa", "fp16"),
                                    ("flex", "fp16"))),
        latency_presets=("esc", "esc_light", "esc_fp"), latency_sizes={s: paper_lr_size(s) for s in (2, 3, 4)},
        latency_runs=(100, 100),
        auto_tile=dict(model="esc_x4", size=(2160, 3840), overlap=None, simulated_limit_px=None),
    )


# --------------------------------------------------------------------------------------------- the context
@dataclass
class Ctx:
    """What a section gets: the device, the plan, the golden fixtures, the clock."""

    device: torch.device
    plan: Plan
    golden: "Golden | None"
    golden_dir: Path
    deadline: float  # epoch seconds at which the budget ends
    reserve_s: float = 0.0  # what the heavy sections after this one need
    cap_s: float = float("inf")  # this section's cap: past it, the supervisor stops the worker
    save_partial: Callable[[dict[str, Any]], None] = lambda result: None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_left(self) -> float:
        """Seconds this section may still use: the budget left minus what later heavy sections need."""
        return self.deadline - time.time() - self.reserve_s

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class Golden:
    """The golden fixtures (``cases.json`` and its files) in one folder; only cases whose files are there."""

    def __init__(self, root: Path):
        self.root = root
        listed = json.loads((root / "cases.json").read_text(encoding="utf-8"))["cases"]
        self.cases = {c["id"]: c for c in listed
                      if (root / c["checkpoint"]["file"]).is_file() and (root / c["tensors"]["file"]).is_file()}

    def model(self, case_id: str, **overrides: Any):
        import esc_arch

        case = self.cases[case_id]
        return esc_arch.load_model(self.root / case["checkpoint"]["file"], **overrides)


# ------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def cuda_flags(*, tf32: bool | None, benchmark: bool | None = None):
    """Set TF32 (matmul and cuDNN) and cudnn.benchmark for a block; None keeps torch's current value."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the legacy switches still work
        try:
            if tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
            if benchmark is not None:
                torch.backends.cudnn.benchmark = benchmark
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def flags_now() -> dict[str, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark}


def measure(ctx: Ctx, fn: Callable[[], Any], *, warmup: int, runs: int) -> dict[str, Any]:
    """The paper's protocol: warm-ups, then empty_cache + reset_peak_memory_stats, then timed runs (CUDA events).

    ``peak_mib`` is ``max_memory_allocated`` over the timed runs (weights and input included, as the paper);
    ``base_mib`` what was allocated when they started (weights, input).
    """
    state: dict[str, float] = {}

    def reset() -> None:
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
            state["base"] = torch.cuda.memory_allocated(ctx.device)
            torch.cuda.synchronize(ctx.device)

    timing = time_callable(fn, ctx.device, warmup=warmup, runs=runs, after_warmup=reset)
    result = {k: v for k, v in timing.as_dict().items() if k != "times_ms"}
    result["peak_mib"] = round(torch.cuda.max_memory_allocated(ctx.device) / MIB, 1) if ctx.cuda else None
    result["base_mib"] = round(state["base"] / MIB, 1) if ctx.cuda else None
    return result


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def photo(size: tuple[int, int] | None) -> torch.Tensor:
    """The repository's photo as a (1, 3, H, W) float tensor in [0, 1]; resized (bicubic) to ``size`` if given."""
    import numpy as np
    from PIL import Image

    image = Image.open(CHELSEA).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


def attention_ops(fn: Callable[[], Any]) -> list[str]:
    """Attention-related operators that ``fn`` dispatches (read from the profiler's CPU-side events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    pattern = re.compile(r"attention|flex|softmax|compiled", re.IGNORECASE)
    return sorted({e.name for e in prof.events() if pattern.search(e.name)})


def htod_copies(ctx: Ctx, fn: Callable[[], Any]) -> dict[str, Any]:
    """Host-to-device copies during ``fn`` (CUDA profiler events); the relative index must not be one."""
    if not ctx.cuda:
        return {"htod_copies": None}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            ctx.sync()
    except Exception as exc:  # the CUDA profiler (CUPTI) may be unavailable: informative only
        return {"htod_copies": f"profiler failed: {short_error(exc)}"}
    names = [e.name for e in prof.events() if "HtoD" in e.name]
    return {"htod_copies": len(names), "htod_kinds": sorted(set(names))}


def flex_fallbacks(caught: list[warnings.WarningMessage]) -> list[str]:
    """Warnings that say flex ran eagerly (ours: compile failed; torch's: called without torch.compile)."""
    keys = ("flex_attention failed", "without torch.compile", "recompile", "cache_size_limit")
    return sorted({str(w.message).splitlines()[0][:200] for w in caught if any(k in str(w.message) for k in keys)})


def preset_model(preset: str, scale: int, backend: str, device: torch.device):
    import esc_arch

    torch.manual_seed(0)
    return esc_arch.PRESETS[preset](scale, attn_type=backend).to(device)


# ================================================================================================ sections
def section_environment(ctx: Ctx) -> dict[str, Any]:
    import esc_arch
    from esc_arch.attention import flex_compiler_available

    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "esc_arch": esc_arch.__version__, "git_commit": _git_commit(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flex_compiler_available": flex_compiler_available(), "flags_at_start": flags_now(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
        for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled",
                     "is_flash_attention_available"):
            probe = getattr(torch.backends.cuda, name, None)
            info[name] = probe() if probe else None
    checks = [check("runs on the requested device", ctx.device.type == ("cpu" if ctx.plan.name == "smoke" else "cuda"),
                    str(ctx.device))]
    if ctx.cuda:
        checks.append(check("Triton importable (flex compiles on CUDA)", info["triton"] is not None, str(info["triton"])))
    return {"summary": info, "checks": checks}


def section_suite(name: str) -> Callable[[Ctx], dict[str, Any]]:
    """The section ``name`` as the test suite's device tests of :data:`SUITE_TESTS` on ``ctx.device``
    (``pytest --device cuda -m device FILES``; the smoke plan narrows them with ``-k``), one row per test, stopped
    before the section's cap or the budget runs out."""

    def run(ctx: Ctx) -> dict[str, Any]:
        if ctx.golden is None:
            return {"skipped": f"no golden fixtures at {ctx.golden_dir}, which the test suite needs (../shared does not "
                               "travel to a device machine: pack them with --pack-golden DIR, carry DIR, pass --golden DIR)"}
        ctx.release()  # the tests run in another process: leave it the device's memory
        timeout = max(min(ctx.cap_s - 15, ctx.time_left()), 10)
        result = suite.run_tests(SUITE_TESTS[name], device=str(ctx.device), keyword=ctx.plan.suite_keywords.get(name),
                                 timeout_s=timeout, env={"ESC_SR_GOLDEN": str(ctx.golden_dir)})
        rows, tail = result.pop("rows"), result.pop("output_tail")
        passed = (result["exit_status"] == 0 and not result["timed_out"] and result["passed"] > 0
                  and result["failed"] == result["error"] == 0)
        result["pytest_says"] = tail[-1] if tail else ""
        if not passed:
            result["output_tail"] = tail
        detail = ", ".join(f"{result[k]} {k}" for k in ("passed", "failed", "error", "skipped") if result[k])
        detail += f" in {result['wall_s']} s" + (f" (stopped at its {result['timeout_s']} s limit)" if result["timed_out"] else "")
        return {"rows": rows, "summary": result, "checks": [
            check(f"the test suite's device tests pass on {ctx.device.type}: {' '.join(SUITE_TESTS[name])}", passed, detail)]}

    run.__name__ = f"section_{name}"
    return run


def section_attention_kernels(ctx: Ctx) -> dict[str, Any]:
    """The kernel probe per preset, backend, dtype and mode, and the operators a real forward pass dispatches."""
    import esc_arch
    import esc_runtime

    probes = []
    for preset in ctx.plan.kernel_presets:
        with torch.device("meta"):  # only the attention hyperparameters are needed
            meta = esc_arch.PRESETS[preset](4)
        for backend in ATTENTION_BACKENDS:
            esc_arch.set_attention_backend(meta, backend)
            for dtype in ctx.plan.dtypes:
                for training in (False, True):
                    try:
                        label = esc_runtime.attention_kernel(meta, ctx.device, DTYPES[dtype], training=training)
                    except Exception as exc:
                        label = f"probe failed: {short_error(exc)}"
                    probes.append({"preset": preset, "backend": backend, "dtype": dtype,
                                   "mode": "training" if training else "inference", "probe": label})

    preset, size = ctx.plan.kernel_model
    rows, checks = [], []
    for backend in ATTENTION_BACKENDS:
        for dtype in ctx.plan.kernel_model_dtypes + ("fp32 training",):
            training = dtype == "fp32 training"
            row: dict[str, Any] = {"preset": preset, "backend": backend, "dtype": dtype, "lr": f"{size[0]}x{size[1]}"}
            if training and backend == "flex" and not ctx.cuda:
                row["ops"] = "n/a: torch has no flex_attention backward on CPU"
                rows.append(row)
                continue
            try:
                model = preset_model(preset, 4, backend, ctx.device)
                x = torch.rand(1, 3, *size, device=ctx.device)
                if training:
                    model.train()
                    step = lambda: model(x).mean().backward()  # noqa: E731
                    step()  # first call (compilation) outside the profile
                    row["probe"] = esc_runtime.attention_kernel(model, ctx.device, torch.float32, training=True)
                    row["ops"] = ", ".join(attention_ops(step))
                    row.update(htod_copies(ctx, step))
                else:
                    # what esc-sr runs: the model prepared by the runtime for this device and dtype
                    model = esc_runtime.prepare(esc_arch.fuse(model).to(DTYPES[dtype]))
                    x = x.to(DTYPES[dtype])
                    row["probe"] = esc_runtime.attention_kernel(model, ctx.device, DTYPES[dtype])
                    with torch.inference_mode():
                        model(x)  # first call (compilation) outside the profile
                        row["ops"] = ", ".join(attention_ops(lambda: model(x)))
                        row.update(htod_copies(ctx, lambda: model(x)))
                if backend == "sdpa":
                    op = re.search(r"\[(\w+)\]", row["probe"])
                    row["probe_matches_ops"] = bool(op and op.group(1) in row["ops"])
            except Exception as exc:
                row["error"] = short_error(exc)
            rows.append(row)
            ctx.release()
    mismatched = [f"{r['backend']} {r['dtype']}" for r in rows if r.get("probe_matches_ops") is False]
    errors = [f"{r['backend']} {r['dtype']}: {r['error']}" for r in rows if "error" in r]
    checks.append(check("the sdpa probe names the kernel a real forward pass runs", not mismatched, ", ".join(mismatched)))
    checks.append(check("a real forward pass runs on every backend and dtype", not errors, "; ".join(errors)[:400]))
    return {"rows": rows, "probes": probes, "checks": checks}


def section_sdpa_kernels(ctx: Ctx) -> dict[str, Any]:
    """Each SDPA kernel forced on ESC's attention (float bias as mask), inference and training; which is fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import esc_runtime

    windows, heads, tokens, head_dim = ctx.plan.sdpa_shape
    kernels = ["default"] + [k for k in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH")
                             if hasattr(SDPBackend, k)]
    warmup, runs = ctx.plan.sdpa_runs
    rows, best = [], {}
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(windows, heads, tokens, head_dim, generator=gen) for _ in range(3)]
    bias0 = torch.randn(1, heads, tokens, tokens, generator=gen) * 0.5
    for dtype in ctx.plan.dtypes:
        for training in (False, True):
            mode = "training" if training else "inference"
            q, k, v = (t.to(ctx.device, DTYPES[dtype], copy=True).requires_grad_(training) for t in base)
            bias = bias0.to(ctx.device, DTYPES[dtype], copy=True).requires_grad_(training)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # reference: the math kernel in fp32
                ref = F.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)), attn_mask=bias.detach().float())
            default_op = esc_runtime.sdpa_kernel_name(device=ctx.device, dtype=DTYPES[dtype], num_heads=heads, tokens=tokens,
                                                   head_dim=head_dim, training=training)
            timings = {}
            for kernel in kernels:
                row: dict[str, Any] = {"dtype": dtype, "mode": mode, "kernel": kernel}

                def call(kernel=kernel):
                    forced = contextlib.nullcontext() if kernel == "default" else sdpa_kernel(getattr(SDPBackend, kernel))
                    with forced, torch.set_grad_enabled(training):
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                        if training:
                            out.sum().backward()
                        return out

                caught: list[warnings.WarningMessage] = []
                try:
                    with warnings.catch_warnings(record=True) as caught:  # torch says there why a kernel refuses
                        warnings.simplefilter("always")
                        out = call()
                    row["max_abs_vs_fp32_math"] = max_abs(out.detach(), ref)
                    del out
                    row.update({k2: v2 for k2, v2 in measure(ctx, call, warmup=warmup, runs=runs).items()
                                if k2 in ("median_ms", "peak_mib")})
                    timings[kernel] = row["median_ms"]
                except RuntimeError as exc:
                    reasons = list(dict.fromkeys(str(w.message).split("(Triggered")[0].strip() for w in caught))
                    row["unsupported"] = " ".join([short_error(exc)] + reasons)
                if kernel == "default":
                    row["dispatched"] = default_op
                rows.append(row)
                for t in (q, k, v, bias):
                    t.grad = None
            forced_timings = {k2: v2 for k2, v2 in timings.items() if k2 != "default"}
            if forced_timings:
                fastest = min(forced_timings, key=forced_timings.get)
                best[f"{dtype} {mode}"] = {
                    "default_dispatches": default_op, "fastest": fastest, "fastest_ms": forced_timings[fastest],
                    "default_ms": timings.get("default"),
                    "default_vs_fastest": round(timings["default"] / forced_timings[fastest], 2) if "default" in timings else None,
                }
            ctx.release()
    return {"rows": rows, "summary": {"shape": {"windows": windows, "heads": heads, "tokens": tokens, "head_dim": head_dim},
                                      "mask": "float bias (1, heads, tokens, tokens), broadcast over windows",
                                      "fastest": best}}


def section_flex_compiled(ctx: Ctx) -> dict[str, Any]:
    """torch.compile of flex_attention per ESC attention shape and dtype: compiled or not, error, latency vs sdpa."""
    import esc_arch
    import esc_runtime
    from esc_arch.attention import WindowAttention

    warmup, runs = ctx.plan.flex_runs
    rows = []
    for name, dim, heads, window, size, dtypes in ctx.plan.flex_configs:
        torch.manual_seed(0)
        master = WindowAttention(dim, window, heads, attn_type="naive").eval().to(ctx.device)  # fp32 weights
        x32 = torch.randn(1, dim, *size, device=ctx.device)
        with torch.inference_mode(), cuda_flags(tf32=False):
            ref = master(x32)
        for dtype in dtypes:
            row: dict[str, Any] = {"config": name, "dim": dim, "heads": heads, "window": window, "dtype": dtype}
            try:
                flex, sdpa = (copy.deepcopy(master).to(DTYPES[dtype]) for _ in range(2))
                flex.attn_type, sdpa.attn_type = "flex", "sdpa"
                x = x32.to(DTYPES[dtype])
                with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ctx.sync()
                    start = time.perf_counter()
                    out = flex(x)
                    ctx.sync()
                    row["first_call_s"] = round(time.perf_counter() - start, 2)
                    row["fallback_warnings"] = flex_fallbacks(caught)
                    signature = (ctx.device.type, DTYPES[dtype], heads, window * window, dim // heads)
                    failed = getattr(esc_arch.attention, "_FLEX_COMPILE_FAILED", set())
                    row["compiled"] = (esc_arch.attention.flex_compiler_available() and signature not in failed
                                       and not row["fallback_warnings"])
                    row["kernel"] = esc_runtime.attention_kernel(flex, ctx.device, DTYPES[dtype])
                    row["max_abs_vs_naive_fp32"] = max_abs(out, ref)
                    row["sdpa_max_abs_vs_naive_fp32"] = max_abs(sdpa(x), ref)
                    row["flex_ms"] = measure(ctx, lambda: flex(x), warmup=warmup, runs=runs)["median_ms"]
                    row["sdpa_ms"] = measure(ctx, lambda: sdpa(x), warmup=warmup, runs=runs)["median_ms"]
                    row["flex_vs_sdpa"] = round(row["flex_ms"] / row["sdpa_ms"], 2)
            except Exception as exc:
                row["error"] = short_error(exc)
            rows.append(row)
            log(f"flex {name} {dtype}: compiled={row.get('compiled')} first call {row.get('first_call_s')} s")
            ctx.release()
    failed = [f"{r['config']} {r['dtype']}" for r in rows if not r.get("compiled")]
    return {"rows": rows, "checks": [check("flex_attention compiles for every ESC shape and dtype (no eager fallback)",
                                           not failed, ", ".join(failed))]}


def section_window_attention(ctx: Ctx) -> dict[str, Any]:
    """WindowAttention alone (the paper's compare_attn.py setting): naive vs sdpa vs flex, time and peak memory."""
    import esc_runtime
    from esc_arch.attention import WindowAttention

    cfg = ctx.plan.window_attention
    warmup, runs = cfg["runs"]
    rows = []
    for backend, dtype in cfg["rows"]:
        row: dict[str, Any] = {"backend": backend, "dtype": dtype}
        try:
            torch.manual_seed(0)
            layer = WindowAttention(cfg["dim"], cfg["window"], cfg["heads"], attn_type=backend).eval().to(ctx.device, DTYPES[dtype])
            x = torch.randn(1, cfg["dim"], *cfg["size"], device=ctx.device, dtype=DTYPES[dtype])
            row["kernel"] = esc_runtime.attention_kernel(layer, ctx.device, DTYPES[dtype])
            with torch.inference_mode():
                row.update(measure(ctx, lambda: layer(x), warmup=warmup, runs=runs))
        except Exception as exc:
            row["error"] = short_error(exc)
        rows.append(row)
        ctx.release()
    naive = next((r for r in rows if r["backend"] == "naive" and r["dtype"] == "fp32" and "error" not in r), None)
    for row in rows:
        if naive and "error" not in row:
            row["speedup_vs_naive"] = round(naive["median_ms"] / row["median_ms"], 2)
            if row["peak_mib"]:
                row["memory_saving_vs_naive"] = round(naive["peak_mib"] / row["peak_mib"], 2)
    return {"rows": rows, "summary": {**{k: cfg[k] for k in ("dim", "heads", "window")}, "size": list(cfg["size"]),
                                      "warmup": warmup, "runs": runs, "paper": PAPER_WINDOW_ATTENTION}}


def section_latency(ctx: Ctx) -> dict[str, Any]:
    """The paper's latency / memory protocol, most wanted rows first, as long as the budget lasts."""
    warmup, runs = ctx.plan.latency_runs
    presets, scales = ctx.plan.latency_presets, sorted(ctx.plan.latency_sizes, reverse=True)  # x4 first
    order = [(p, s, "sdpa", "fp32") for s in scales for p in presets]
    order += [(p, s, "flex", "fp32") for s in scales for p in presets]
    order += [(p, scales[0], "naive", "fp32") for p in presets]
    order += [(p, scales[0], "sdpa", "fp16") for p in presets] if ctx.cuda else []  # fp16 on a CPU: minutes
    order += [(p, s, "naive", "fp32") for s in scales[1:] for p in presets]
    rows: list[dict[str, Any]] = []
    result = {"rows": rows, "summary": {"protocol": f"batch 1, fused model, input uniform [0, 1], {warmup} warm-ups, "
                                                    f"{runs} runs timed with CUDA events, max_memory_allocated",
                                        "paper": "Table 2, measured with attn_type='Flex' (our flex rows), fp32",
                                        "flags": None}}
    with cuda_flags(tf32=None, benchmark=True):  # as test_direct_metrics: cudnn.benchmark on, torch's TF32 defaults
        result["summary"]["flags"] = flags_now()
        for preset, scale, backend, dtype in order:
            h, w = ctx.plan.latency_sizes[scale]
            row: dict[str, Any] = {"preset": preset, "scale": scale, "lr": f"{h}x{w}", "backend": backend, "dtype": dtype}
            if (preset, scale) in PAPER_TABLE2:
                row["paper_ms"], row["paper_mb"] = PAPER_TABLE2[(preset, scale)]
            if ctx.time_left() < 5:
                rows.append({**row, "skipped": "budget"})
                continue
            try:
                row.update(_latency_case(ctx, preset, scale, backend, dtype, (h, w), warmup, runs))
            except Exception as exc:
                row["error"] = short_error(exc)
            rows.append(row)
            log(f"latency {preset} x{scale} {backend} {dtype}: {row.get('median_ms', row.get('skipped', row.get('error')))}")
            ctx.release()
            ctx.save_partial(result)
    skipped = sum(1 for r in rows if "skipped" in r)
    if skipped:
        result["notes"] = [f"{skipped} of {len(rows)} cases skipped: the budget ran short (--budget-s)"]
    return result


def _latency_case(ctx, preset, scale, backend, dtype, size, warmup, runs) -> dict[str, Any]:
    import esc_arch

    model = esc_arch.fuse(preset_model(preset, scale, backend, ctx.device)).to(DTYPES[dtype])
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(ctx.device, DTYPES[dtype])
    outputs: list[torch.Size] = []
    with torch.inference_mode():
        first = time_once(lambda: outputs.append(model(x).shape), ctx.device)
        once = time_once(lambda: model(x), ctx.device)
        estimate = (warmup + runs) * once / 1e3
        if estimate > ctx.time_left():
            return {"skipped": f"budget: about {estimate:.0f} s needed, {max(ctx.time_left(), 0):.0f} s left", "first_call_ms": round(first, 1)}
        timed = measure(ctx, lambda: model(x), warmup=warmup, runs=runs)
    out_shape = list(outputs[0])
    timed["first_call_ms"] = round(first, 1)
    timed["output"] = f"{out_shape[-2]}x{out_shape[-1]}"
    timed["params"] = esc_arch.count_parameters(model)
    if ctx.cuda:  # what the engine's memory estimate needs: activation bytes per LR pixel
        timed["activation_bytes_per_lr_pixel"] = round((timed["peak_mib"] - timed["base_mib"]) * MIB / (size[0] * size[1]))
    return timed


def section_auto_tile(ctx: Ctx) -> dict[str, Any]:
    """``esc_sr.upscale(tile='auto')`` on a 4K image against untiled, then out-of-memory halving under a memory limit."""
    import esc_arch
    import esc_sr

    cfg = ctx.plan.auto_tile
    if cfg["model"] == "default":
        model, weights = esc_arch.load_model("default"), "default model"
    elif ctx.golden is not None and cfg["model"] in ctx.golden.cases:
        model, weights = ctx.golden.model(cfg["model"]), f"golden {cfg['model']}"
    else:  # random weights, with the zero-initialised layers filled so the global pools matter
        model, weights = preset_model("esc", 4, "sdpa", torch.device("cpu")), "random (no golden fixtures)"
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
    model = esc_arch.fuse(model.to(ctx.device))
    image = photo(cfg["size"])
    kwargs = {} if cfg["overlap"] is None else {"overlap": cfg["overlap"]}
    if "max_memory" in inspect.signature(esc_sr.upscale).parameters:
        # the host-RAM guard reads MemAvailable, which on a device machine starts far below what it can grow to;
        # this section checks the device path, so the guard is off (the 4K output needs about 8 GB of RAM)
        kwargs["max_memory"] = None
    rows: list[dict[str, Any]] = []

    def run(label: str, tile, precision: str, limit: Callable[[], contextlib.AbstractContextManager] | None = None):
        row: dict[str, Any] = {"run": label, "tile": str(tile), "precision": precision}
        passes: list[int] = []  # the tile count of each pass (statistics, output, redone after an OOM)

        def progress(done: int, total: int) -> None:
            if done == 0:
                passes.append(total)
        ctx.release()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            with (limit() if limit else contextlib.nullcontext()) as limit_info, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                out = esc_sr.upscale(model, image, tile=tile, precision=precision, device=ctx.device,
                                     progress=progress, **kwargs)
                ctx.sync()
                row["seconds"] = round(time.perf_counter() - start, 3)
            row["tiles_per_pass"] = passes
            row["oom_halvings"] = sum("out of memory" in str(w.message).lower() for w in caught)
            row["warnings"] = sorted({str(w.message).splitlines()[0][:160] for w in caught})
            if limit_info:
                row["memory_limit"] = limit_info
            if ctx.cuda:
                row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(ctx.device) / MIB)
        except Exception as exc:
            row["error"] = short_error(exc)
            out = None
        rows.append(row)
        log(f"auto tile {label}: {row.get('seconds', row.get('error'))} s, passes {row.get('tiles_per_pass')}")
        ctx.save_partial({"rows": rows})
        return out, row

    untiled_peak: list[int] = []
    with cuda_flags(tf32=False, benchmark=False):
        reference, ref_row = run("untiled fp32 (reference)", None, "fp32")
        if ctx.cuda and "error" not in ref_row:
            untiled_peak.append(ref_row["peak_gpu_mib"] * MIB)
        auto, auto_row = run("tile='auto' fp32", "auto", "fp32")
        compare(auto, reference, auto_row, ref_row)
        del auto
        # Layer-streamed exact tiling (the target on CPU: <= 1.35x the untiled time); its peak is the tile
        # plus the whole feature maps.
        streamed, streamed_row = run("tile=512 fp32 (layer-streamed)", 512, "fp32")
        compare(streamed, reference, streamed_row, ref_row)
        if "seconds" in streamed_row and "seconds" in ref_row:
            streamed_row["vs_untiled"] = round(streamed_row["seconds"] / ref_row["seconds"], 3)
        del streamed
        limited, limited_row = run("tile='auto' fp32, forced memory limit", "auto", "fp32",
                                   limit=lambda: memory_limit(ctx, model, untiled_peak))
        compare(limited, reference, limited_row, ref_row)
        del limited, reference
    default_untiled, default_ref = run("untiled, default precision", None, "auto")
    default_auto, default_row = run("tile='auto', default precision (the default path)", "auto", "auto")
    compare(default_auto, default_untiled, default_row, default_ref, informative=True)
    del default_untiled, default_auto
    checks = [check(f"{r['run']}: equals the untiled run within 1/255", r["within_1_255"], f"max diff {r['max_diff_255']}/255")
              for r in rows if "within_1_255" in r and not r.get("informative")]
    limited_runs = [r for r in rows if "memory_limit" in r or "forced" in r["run"]]
    checks.append(check("the forced memory limit finishes (out-of-memory halving instead of a failure)",
                        all("error" not in r for r in limited_runs), "; ".join(r.get("error", "") for r in limited_runs)))
    return {"rows": rows, "checks": checks,
            "summary": {"image": f"{cfg['size'][1]}x{cfg['size'][0]} (LR)", "model": f"{model.arch_name} x{model.scale}",
                        "weights": weights, "overlap": cfg["overlap"] or "default"}}


def compare(out, ref, row, ref_row, *, informative: bool = False) -> None:
    if out is None or ref is None:
        return
    diff = max_abs(out, ref)
    row.update(max_diff_255=round(diff * 255, 3), within_1_255=diff <= 1 / 255 + 1e-6, informative=informative)
    if ref_row.get("seconds") and row.get("seconds"):
        row["vs_untiled"] = round(row["seconds"] / ref_row["seconds"], 2)


@contextlib.contextmanager
def memory_limit(ctx: Ctx, model, untiled_peak: list[int]):
    """A memory budget that the untiled run does not fit: on CUDA ``set_per_process_memory_fraction`` at an eighth
    of the untiled peak (at least 1 GiB); on CPU a simulated out-of-memory error from every convolution whose input
    has more than ``simulated_limit_px`` pixels."""
    if ctx.cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        limit = max(untiled_peak[0] // 8 if untiled_peak else 4 << 30, 1 << 30)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(limit / total, ctx.device)
        try:
            yield f"set_per_process_memory_fraction: {limit / 2**30:.1f} GiB"
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
            torch.cuda.empty_cache()
        return
    limit_px = ctx.plan.auto_tile["simulated_limit_px"]

    def too_big(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4 and args[0].shape[-2] * args[0].shape[-1] > limit_px:
            raise torch.OutOfMemoryError(f"simulated out of memory: input of {tuple(args[0].shape[-2:])} > {limit_px} px")

    hooks = [m.register_forward_pre_hook(too_big) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        yield f"simulated: out of memory above {limit_px} px per convolution input"
    finally:
        for hook in hooks:
            hook.remove()


def check(name: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ============================================================================================ section table
@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    cap_s: float  # a section running longer is stopped (its worker is killed) and recorded
    heavy: bool = False  # skipped when less than min_s of the budget is left
    min_s: float = 0.0
    columns: tuple[tuple[str, str], ...] = ()  # (key, header) of its Markdown table


SUITE_COLUMNS = (("test", "test"), ("outcome", "outcome"), ("duration_s", "s"), ("message", "message"))
SECTIONS: tuple[Section, ...] = (
    Section("environment", section_environment, cap_s=60),
    Section("golden", section_suite("golden"), cap_s=240, columns=SUITE_COLUMNS),
    Section("attention_kernels", section_attention_kernels, cap_s=180, columns=(
        ("backend", "backend"), ("dtype", "dtype"), ("probe", "attention_kernel()"), ("ops", "operators dispatched"),
        ("probe_matches_ops", "probe = ops"), ("htod_copies", "host→device copies"), ("error", "error"))),
    Section("sdpa_kernels", section_sdpa_kernels, cap_s=90, columns=(
        ("dtype", "dtype"), ("mode", "mode"), ("kernel", "kernel"), ("median_ms", "median ms"),
        ("max_abs_vs_fp32_math", "max abs vs fp32 math"), ("dispatched", "default dispatches"),
        ("unsupported", "unsupported"))),
    Section("flex_compiled", section_flex_compiled, cap_s=240, columns=(
        ("config", "config"), ("dtype", "dtype"), ("compiled", "compiled"), ("first_call_s", "first call s"),
        ("max_abs_vs_naive_fp32", "max abs vs naive"), ("flex_ms", "flex ms"), ("sdpa_ms", "sdpa ms"),
        ("flex_vs_sdpa", "flex / sdpa"), ("fallback_warnings", "fallback warnings"), ("error", "error"))),
    Section("precision", section_suite("precision"), cap_s=120, columns=SUITE_COLUMNS),
    Section("training_step", section_suite("training_step"), cap_s=120, columns=SUITE_COLUMNS),
    Section("window_attention", section_window_attention, cap_s=120, heavy=True, min_s=20, columns=(
        ("backend", "backend"), ("dtype", "dtype"), ("kernel", "kernel"), ("median_ms", "median ms"),
        ("speedup_vs_naive", "speed-up vs naive"), ("peak_mib", "peak MiB"), ("memory_saving_vs_naive", "memory saving"),
        ("error", "error"))),
    Section("latency", section_latency, cap_s=float("inf"), heavy=True, min_s=20, columns=(
        ("preset", "preset"), ("scale", "scale"), ("lr", "LR"), ("backend", "backend"), ("dtype", "dtype"),
        ("median_ms", "median ms"), ("mean_ms", "mean ms"), ("peak_mib", "peak MiB"), ("paper_ms", "paper ms"),
        ("paper_mb", "paper MB"), ("activation_bytes_per_lr_pixel", "act. B / LR px"), ("first_call_ms", "first call ms"),
        ("error", "error"), ("skipped", "skipped"))),
    Section("auto_tile", section_auto_tile, cap_s=200, heavy=True, min_s=75, columns=(
        ("run", "run"), ("seconds", "s"), ("vs_untiled", "vs untiled"), ("tiles_per_pass", "tiles per pass"),
        ("oom_halvings", "OOM halvings"), ("max_diff_255", "max diff (/255)"), ("peak_gpu_mib", "peak MiB"),
        ("memory_limit", "memory limit"), ("error", "error"))),
)
BY_NAME = {s.name: s for s in SECTIONS}


# ================================================================================================ reporting
def render_markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu')} ({m.get('logical_cpus')} CPUs)"
    lines = [f"# GPU check: {where} ({results['profile']})", "",
             f"torch {m.get('torch')}, CUDA {m.get('cuda')}, started {results.get('started_utc')}, "
             f"budget {results['budget_s']:.0f} s, wall {results.get('wall_s', 0):.0f} s"
             + ("" if results.get("finished") else " (**unfinished**)") + ".", "",
             "| section | status | s | checks | note |", "|---|---|---:|---|---|"]
    for name, entry in results["sections"].items():
        checks = entry.get("checks", [])
        passed = sum(c["passed"] for c in checks)
        note = entry.get("reason") or entry.get("error") or "; ".join(entry.get("notes", []))
        lines.append(f"| {name} | {entry['status']} | {entry.get('wall_s', '')} | "
                     f"{f'{passed}/{len(checks)}' if checks else ''} | {_cell(note)} |")
    for name, entry in results["sections"].items():
        lines += ["", f"## {name}: {entry['status']}", ""]
        for key in ("reason", "error"):
            if entry.get(key):
                lines.append(f"**{key}**: {_cell(entry[key])}\n")
        for c in entry.get("checks", []):
            lines.append(f"- {'PASS' if c['passed'] else 'FAIL'}: {c['check']}" + (f" ({_cell(c['detail'])})" if c["detail"] else ""))
        for key, value in (entry.get("summary") or {}).items():
            lines.append(f"- {key}: {_cell(json.dumps(value) if isinstance(value, (dict, list)) else value, 3000)}")
        for note in entry.get("notes", []):
            lines.append(f"- note: {note}")
        rows = entry.get("rows") or []
        columns = [c for c in BY_NAME[name].columns if any(c[0] in r for r in rows)] if name in BY_NAME else []
        if rows and columns:
            lines += ["", "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any, limit: int = 300) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:,.2f}"
    elif isinstance(value, bool):
        text = "yes" if value else "**no**"
    elif isinstance(value, list):
        text = ", ".join(map(str, value))
    else:
        text = str(value)
    return text.replace("|", "/").replace("\n", " ")[:limit]


def save(path: Path, results: dict[str, Any]) -> None:
    write_json_atomic(path, results)
    write_text_atomic(path.with_suffix(".md"), render_markdown(results))


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ================================================================================================== worker
def worker(args: argparse.Namespace) -> int:
    """Run the given sections in order in this process, saving the results after each one."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # parameters report cuda:0; the engine compares devices
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":  # the smoke run: one thread, as OpenMP threads that wait for time slices spin
        torch.set_num_threads(1)
    path = Path(args.results)
    results = load(path)
    golden = Golden(Path(args.golden)) if (Path(args.golden) / "cases.json").is_file() else None
    plan = make_plan(args.smoke)
    names = args.sections.split(",")
    fault = dict(item.split("=", 1) for item in os.environ.get("ESC_GPU_CHECK_FAULT", "").split(",") if "=" in item)
    for index, name in enumerate(names):
        section = BY_NAME[name]
        reserve = sum(BY_NAME[n].min_s for n in names[index + 1:] if BY_NAME[n].heavy)
        ctx = Ctx(device=device, plan=plan, golden=golden, golden_dir=Path(args.golden), deadline=args.deadline,
                  reserve_s=reserve, cap_s=section_cap(section, args.smoke, args.cap_s))
        entry: dict[str, Any] = {"status": "running", "started_epoch": time.time(),
                                 "started_at_s": round(time.time() - results["started_epoch"], 1)}
        if section.heavy and ctx.deadline - time.time() < section.min_s:
            entry = {"status": "skipped", "reason": f"budget: {max(ctx.deadline - time.time(), 0):.0f} s left of "
                                                    f"--budget-s {results['budget_s']:.0f}, this section needs {section.min_s:.0f} s"}
            results["sections"][name] = entry
            save(path, results)
            log(f"{name}: skipped ({entry['reason']})")
            continue
        results["sections"][name] = entry

        def save_partial(partial: dict[str, Any], entry=entry) -> None:
            entry.update(partial)
            save(path, results)

        ctx.save_partial = save_partial
        save(path, results)
        log(f"== {name} (cap {section.cap_s:.0f} s, {ctx.deadline - time.time():.0f} s of budget left)")
        try:
            inject_fault(fault.get(name))
            outcome = section.run(ctx)
            if "skipped" in outcome:
                entry.update(status="skipped", reason=outcome["skipped"])
            else:
                entry.update(outcome)
                entry["status"] = "failed" if any(not c["passed"] for c in outcome.get("checks", [])) else "ok"
        except Exception as exc:
            entry.update(status="error", error=short_error(exc), traceback=traceback.format_exc()[-3000:])
        finally:
            ctx.release()
        entry["wall_s"] = round(time.time() - entry.pop("started_epoch"), 1)
        save(path, results)
        log(f"{name}: {entry['status']} in {entry['wall_s']} s")
        if ctx.cuda and not cuda_healthy(ctx.device):  # a sticky CUDA error: the supervisor starts a fresh worker
            log("the CUDA context is broken; this worker stops")
            return 3
    return 0


def cuda_healthy(device: torch.device) -> bool:
    try:
        (torch.ones(1, device=device) + 1).item()
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def inject_fault(kind: str | None) -> None:
    """Test hook (``ESC_GPU_CHECK_FAULT=section=crash|hang|raise``): what a broken section can do to a worker."""
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "raise":
        raise RuntimeError("injected fault")


# ============================================================================================== supervisor
def supervise(args: argparse.Namespace, device: torch.device) -> int:
    """Start workers until every selected section has a result; stop one that overruns; record crashes."""
    start = time.time()
    info = machine_info(device)
    suffix = ("-smoke" if args.smoke else "") + ("-partial" if args.only else "")  # never overwrite a whole run
    path = Path(args.out) / f"gpu-{machine_slug(info)}{suffix}.json"
    names = [s.name for s in SECTIONS if not args.only or s.name in args.only]
    results: dict[str, Any] = {
        "tool": "python -m benchmarks gpu_check", "profile": "smoke" if args.smoke else "full", "device": str(device),
        "machine": info, "started_utc": info["started_utc"], "started_epoch": start, "budget_s": args.budget_s,
        "hard_limit_s": args.budget_s + HARD_GRACE_S, "golden_dir": str(args.golden), "finished": False,
        "sections": {n: {"status": "pending"} for n in names},
    }
    save(path, results)
    deadline, hard_deadline = start + args.budget_s, start + args.budget_s + HARD_GRACE_S
    log(f"gpu_check ({results['profile']}) on {info.get('gpu') or info.get('cpu')}: {', '.join(names)}; writing {path}")
    while True:
        pending = [n for n in names if results["sections"][n]["status"] == "pending"]
        if not pending:
            break
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", "--results", str(path), "--sections",
                   ",".join(pending), "--deadline", repr(deadline), "--device", str(device), "--golden", str(args.golden)]
        command += (["--smoke"] if args.smoke else []) + (["--cap-s", repr(args.cap_s)] if args.cap_s else [])
        with path.with_suffix(".log").open("a", encoding="utf-8") as log_file:
            outcome, tail = run_worker(command, path, hard_deadline, args.smoke, args.cap_s, log_file)
        results = load(path) or results
        progressed = False
        for name in pending:
            entry = results["sections"][name]
            if entry["status"] == "running":
                entry.update(status="error", error=f"{outcome}; last output: {' / '.join(tail)[-1500:]}",
                             wall_s=round(time.time() - entry.pop("started_epoch", time.time()), 1))
            progressed |= entry["status"] != "pending"
        if not progressed:  # the worker died before any section: it would again
            for name in pending:
                results["sections"][name] = {"status": "error", "error": f"worker did not start a section ({outcome}); "
                                                                        f"last output: {' / '.join(tail)[-1500:]}"}
        if time.time() > hard_deadline:
            for name in pending:
                if results["sections"][name]["status"] == "pending":
                    results["sections"][name] = {"status": "skipped", "reason": "hard time limit reached"}
        save(path, results)
    results.update(finished=True, wall_s=round(time.time() - start, 1))
    save(path, results)
    bad = [n for n in names if results["sections"][n]["status"] not in ("ok", "skipped")]
    for name in names:
        entry = results["sections"][name]
        print(f"{name:18s} {entry['status']:8s} {entry.get('wall_s', '')!s:>7} {entry.get('reason') or entry.get('error') or ''}"[:200])
    print(f"wrote {path}, {path.with_suffix('.md')} and the workers' log {path.with_suffix('.log')} "
          f"in {results['wall_s']:.0f} s")
    return 1 if bad else 0


def section_cap(section: Section, smoke: bool, override: float | None) -> float:
    """Seconds the section may run before its worker is stopped: ``--cap-s`` (tests), else its own cap, tripled for
    the smoke run on a CPU."""
    return override or section.cap_s * (3.0 if smoke else 1.0)


def run_worker(command: list[str], path: Path, hard_deadline: float, smoke: bool, cap_override: float | None,
               log_file) -> tuple[str, list[str]]:
    """Run one worker; kill it (and its compiler subprocesses) when its section overruns its cap or the hard limit."""
    tail: collections.deque[str] = collections.deque(maxlen=15)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip()[:300])
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.write(line)
                log_file.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = None
    while proc.poll() is None:
        time.sleep(0.5)
        results = load(path) or {}
        running = [(n, e) for n, e in results.get("sections", {}).items() if e.get("status") == "running"]
        cap = None
        if running:
            name, entry = running[0]
            cap = section_cap(BY_NAME[name], smoke, cap_override)
            if time.time() - entry.get("started_epoch", time.time()) > cap:
                killed = f"stopped: ran past its {cap:.0f} s cap"
        if time.time() > hard_deadline:
            killed = "stopped: the hard time limit (--budget-s + 60 s) was reached"
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    if killed:
        return killed, list(tail)
    code = proc.returncode
    outcome = f"worker killed by signal {signal.Signals(-code).name}" if code < 0 else f"worker exited with status {code}"
    return outcome, list(tail)


# ============================================================================================ pack golden
def pack_golden(source: Path, dest: Path, max_mb: float) -> int:
    """Copy the golden cases that a device upload (64 MiB with the repository) can carry into ``dest``."""
    listed = json.loads((source / "cases.json").read_text(encoding="utf-8"))
    keep, total = [], 0
    for case in listed["cases"]:
        if case["id"] in PACK_SKIP:
            log(f"skip {case['id']} (covered by {PACK_SKIP[case['id']]})")
            continue
        keep.append(case)
        total += sum((source / case[k]["file"]).stat().st_size for k in ("checkpoint", "tensors"))
    if total > max_mb * 1e6:
        raise SystemExit(f"the packed fixtures would be {total / 1e6:.1f} MB, over --max-mb {max_mb}")
    dest.mkdir(parents=True, exist_ok=True)
    for case in keep:
        for k in ("checkpoint", "tensors"):
            shutil.copy2(source / case[k]["file"], dest / case[k]["file"])
    write_json_atomic(dest / "cases.json", {**listed, "cases": keep, "packed_from": str(source)})
    print(f"packed {len(keep)} golden cases ({total / 1e6:.1f} MB) into {dest}; carry it and pass --golden {dest}")
    return 0


# ==================================================================================================== main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Sections: " + ", ".join(BY_NAME))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of gpu-<machine>.json / .md")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time the run may take (default 420)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, every section on its smallest case")
    parser.add_argument("--device", help="default: cuda (full), cpu (--smoke)")
    parser.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN, help="golden fixtures folder (cases.json)")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run these sections only")
    parser.add_argument("--cap-s", type=float, help=argparse.SUPPRESS)  # tests: one cap for every section
    parser.add_argument("--pack-golden", type=Path, metavar="DIR", help="copy the golden fixtures to DIR and exit")
    parser.add_argument("--max-mb", type=float, default=55.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--sections", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pack_golden:
        return pack_golden(args.golden, args.pack_golden, args.max_mb)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu_check needs CUDA, and torch {torch.__version__} sees no GPU here; "
              "use --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.worker:
        return worker(args)
    return supervise(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
