"""A selection of the test suite run on a device in a subprocess, each test recorded as it finishes.

``gpu_check``'s ``golden``, ``precision`` and ``training_step`` sections are the suite's own tests
(``pytest --device cuda -m device <files>``, see tests/conftest.py) rather than a second copy of their checks.
:func:`run_tests` starts that pytest with this module loaded as a plugin (``-p benchmarks.suite``): the plugin
appends one JSON line per test (node id, outcome, seconds, the first line of a failure) to the file named by
``$ESC_SUITE_RECORD`` the moment the test ends, so a run stopped at its time limit still reports what it finished.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import REPO_ROOT

RECORD_ENV = "ESC_SUITE_RECORD"
_REPORTS: dict[str, dict[str, Any]] = {}  # plugin side: per test, its phases so far


def run_tests(files: tuple[str, ...], *, device: str, keyword: str | None = None, timeout_s: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m pytest --device DEVICE -m device [-k KEYWORD] FILES`` from the repository root, stopped after
    ``timeout_s``.  Returns the command, its exit status, wall time, whether it timed out, the outcome counts, one
    row per finished test and the tail of pytest's output."""
    options = [f"--device={device}", "-m", "device", *(["-k", keyword] if keyword else []), *files]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.suite", *options]
    with tempfile.TemporaryDirectory(prefix="esc-suite-") as folder:
        record = Path(folder) / "tests.jsonl"
        record.touch()
        start = time.perf_counter()
        # Its own process group, so that a timeout stops its compiler workers too; the plugin makes it die with
        # this process (a section worker that the supervisor kills takes its pytest along).
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **(env or {}), RECORD_ENV: str(record)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        wall_s = time.perf_counter() - start
        rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = collections.Counter(row["outcome"] for row in rows)
    tail = [line for line in output.splitlines() if line.strip()][-25:]
    return {
        "command": "python -m pytest -q " + shlex.join(options),
        "device": device, "exit_status": proc.returncode, "timed_out": timed_out, "timeout_s": round(timeout_s),
        "wall_s": round(wall_s, 1), "tests_s": round(sum(row["duration_s"] for row in rows), 1),
        **{outcome: counts.get(outcome, 0) for outcome in ("passed", "failed", "error", "skipped")},
        "rows": rows, "output_tail": tail,
    }


# ================================================================================= pytest plugin (in the child)
def pytest_configure(config) -> None:
    """Die with the parent (Linux): a section worker killed at its cap must not leave this pytest running."""
    if os.environ.get(RECORD_ENV) and sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def pytest_runtest_logreport(report) -> None:
    """Fold the setup / call / teardown reports of a test into one row; write it after the teardown."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    row = _REPORTS.setdefault(report.nodeid, {"test": report.nodeid, "outcome": "passed", "duration_s": 0.0})
    row["duration_s"] += report.duration
    if report.failed and row["outcome"] not in ("failed", "error"):
        row["outcome"] = "failed" if report.when == "call" else "error"
        row["message"] = _first_line(report)
    elif report.skipped and row["outcome"] == "passed":
        row["outcome"] = "skipped"
        row["message"] = _first_line(report)
    if report.when == "teardown":
        row = _REPORTS.pop(report.nodeid)
        row["duration_s"] = round(row["duration_s"], 3)
        row["test"] = row["test"].removeprefix("tests/")
        with open(path, "a", encoding="utf-8") as record:
            record.write(json.dumps(row) + "\n")


def _first_line(report) -> str:
    """The line that says why (the assertion or exception, or the skip reason), at most 300 characters."""
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[-1])[:300]
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return (text.strip().splitlines() or [""])[0][:300]
