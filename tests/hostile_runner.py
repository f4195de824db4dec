"""Runs hostile cases in a process whose address space is capped, and reports each one's outcome and peak memory.

Used by tests/test_hostile_inputs.py as ``python tests/hostile_runner.py CASES.json``; prints one JSON object. The
cap (``RLIMIT_AS``) is set after the imports and a warm-up load, at the address space then in use plus
``--headroom`` MB: a regression that allocates gigabytes fails (MemoryError, an allocation error) instead of
eating the machine. Each case's peak is the growth of the resident set (``VmHWM``, reset before each case through
``/proc/self/clear_refs``) over the resident set before it.

Case kinds: ``load`` (esc_arch.load_model), ``read`` (esc_sr.images.read_image), ``upscale`` (esc_sr.upscale of
a zero image of a given shape), ``cli`` (esc_sr.cli.main, stderr captured) and ``fuzz`` (truncations and byte flips
of a valid checkpoint, each loaded).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import sys
import traceback

os.environ.setdefault("MALLOC_ARENA_MAX", "2")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _run(case: dict, tools: dict) -> dict:
    import esc_arch

    kind = case["kind"]
    result: dict = {}
    if kind == "load":
        tools["esc_arch"].load_model(case["path"], **case.get("kwargs", {}))
        result["outcome"] = "ok"
    elif kind == "read":
        tools["images"].read_image(case["path"], **case.get("kwargs", {}))
        result["outcome"] = "ok"
    elif kind == "upscale":
        import numpy as np

        out = tools["esc_sr"].upscale(tools["model"], np.zeros(case["shape"], np.uint8), **case.get("kwargs", {}))
        result["outcome"] = "ok"
        result["shape"] = list(out.shape)
    elif kind == "cli":
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = tools["cli"].main([str(a) for a in case["argv"]])
        result.update(outcome="exit", code=code, stderr=err.getvalue())
    elif kind == "fuzz":
        data = open(case["path"], "rb").read()
        rng = random.Random(case["seed"])
        counts: dict[str, int] = {"loaded": 0, "CheckpointError": 0}
        others: list[str] = []
        truncated_loaded = 0
        target = case["scratch"]
        for i in range(case["count"]):
            if i % 2 == 0:
                mutated, how = data[: rng.randrange(0, len(data))], "truncated"
            else:
                buf = bytearray(data)
                for _ in range(rng.choice((1, 1, 2, 4))):
                    buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                mutated, how = bytes(buf), "flipped"
            with open(target, "wb") as handle:
                handle.write(mutated)
            try:
                tools["esc_arch"].load_model(target)
                counts["loaded"] += 1
                truncated_loaded += how == "truncated"
            except esc_arch.CheckpointError as e:
                counts["CheckpointError"] += 1
                if "\n" in str(e):
                    others.append(f"{how}: multi-line message {str(e)!r}")
            except BaseException as e:  # noqa: BLE001 - the point is to see any other exception
                others.append(f"{how}: {type(e).__name__}: {str(e)[:200]}")
        result.update(outcome="fuzz", counts=counts, others=others, truncated_loaded=truncated_loaded)
    else:
        raise ValueError(kind)
    return result


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    headroom = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    import torch

    torch.set_num_threads(1)
    import esc_arch
    import esc_sr
    from esc_sr import cli, images

    # Warm up what every case uses, before the cap: imports, a model build, a load, an upscale, a resize, encoders.
    model = esc_arch.esc_tiny(2, dim=16, pdim=4, n_blocks=1, conv_blocks=1, num_heads=1).eval()
    warm = os.path.join(os.path.dirname(sys.argv[1]), "warm.safetensors")
    esc_sr.save_model(model, warm)
    esc_arch.load_model(warm)
    import numpy as np

    esc_sr.upscale(model, np.zeros((8, 8, 3), np.uint8))
    esc_sr.upscale(model, np.zeros((8, 8, 3), np.uint8), outscale=3)  # chainner-ext's resize
    images.encode_image(np.zeros((8, 8, 3), np.uint8), ".png")  # OpenCV (its import maps a lot: before the cap)
    images.encode_image(np.zeros((8, 8, 3), np.uint8), ".jpg")
    tools = {"esc_arch": esc_arch, "esc_sr": esc_sr, "cli": cli, "images": images, "model": model}

    cap = _status("VmSize") + headroom * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    results = {}
    for case in cases:
        _reset_peak()
        before = _status("VmRSS")
        try:
            result = _run(case, tools)
        except esc_arch.ESCError as e:
            result = {"outcome": type(e).__name__, "message": str(e)}
        except BaseException as e:  # noqa: BLE001
            result = {"outcome": "OTHER " + type(e).__name__, "message": str(e)[:300],
                      "traceback": traceback.format_exc()[-2000:]}
        result["peak_mb"] = round((_status("VmHWM") - before) / 2**20, 1)
        results[case["name"]] = result
    print(json.dumps({"results": results, "cap_mb": round(cap / 2**20)}))


if __name__ == "__main__":
    main()
