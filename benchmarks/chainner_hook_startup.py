"""How much does the `esc-sr chainner` startup hook slow down interpreter start?

The hook runs at every start of the Python it is installed into (chaiNNer's backend and its pip
runs), so it must cost nothing measurable.  This makes two throw-away venvs of this interpreter,
one with the hook installed, and times ``python -c pass`` in each, alternating, N times; it also
reports the hook module's own import time from ``python -X importtime``.

    python -m benchmarks chainner_hook_startup [--runs 40]   # or python benchmarks/chainner_hook_startup.py
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esc_sr.chainner_hook import HOOK_MODULE, install_hook  # noqa: E402


def _start_time(python: Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], check=True)
    return time.perf_counter() - start


def _hook_import_us(python: Path) -> int:
    done = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True)
    for line in done.stderr.splitlines():
        if line.rstrip().endswith(HOOK_MODULE):
            return int(re.split(r"[:|]", line)[2].strip())  # "import time: self | cumulative | name"
    raise RuntimeError("the hook was not imported at start-up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pythons = {}
        for name in ("without hook", "with hook"):
            root = Path(tmp) / name.replace(" ", "_")
            venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
            pythons[name] = root / "bin" / "python"
        install_hook(pythons["with hook"], require_esc_arch=False)
        for python in pythons.values():  # warm the page cache and .pyc files
            _start_time(python)
        times: dict[str, list[float]] = {name: [] for name in pythons}
        for _ in range(args.runs):
            for name, python in pythons.items():
                times[name].append(_start_time(python))
        imports = [_hook_import_us(pythons["with hook"]) for _ in range(10)]

    print(f"python -c pass, {args.runs} runs each, alternating ({sys.version.split()[0]})")
    for name, values in times.items():
        print(f"  {name:13s} median {statistics.median(values) * 1e3:7.2f} ms   min {min(values) * 1e3:7.2f} ms")
    delta = statistics.median(times["with hook"]) - statistics.median(times["without hook"])
    print(f"  difference of medians: {delta * 1e3:+.2f} ms")
    print(f"  hook module import (-X importtime, cumulative): median {statistics.median(imports)} us, max {max(imports)} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
