"""``python -m benchmarks gpu_check --smoke``: every section of the GPU check runs on the CPU on its smallest case,
and the results (JSON and Markdown) have the structure the GPU run will fill in; the golden, precision and training
sections are the test suite's own device tests (``pytest --device cpu -m device -k ...``).

Structure only, never timings. The supervisor's safety nets are tested too: a crashing or hanging section is
recorded and the others still run; a short budget skips the heavy sections with a reason; without CUDA (and
without ``--smoke``) the script refuses in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def run_check(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def results_of(out: Path) -> tuple[dict, str]:
    [path] = out.glob("gpu-*-smoke*.json")
    return json.loads(path.read_text(encoding="utf-8")), path.with_suffix(".md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    proc = run_check("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return results_of(out)


def test_every_section_ran(smoke):
    results, _ = smoke
    assert results["profile"] == "smoke" and results["finished"] is True
    assert list(results["sections"]) == [s.name for s in gpu_check.SECTIONS]
    for name, entry in results["sections"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry.get("error"), entry.get("traceback"))
        if entry["status"] == "skipped":
            assert entry["reason"], name
        assert entry["wall_s"] >= 0
        assert all(c["passed"] for c in entry.get("checks", [])), (name, entry["checks"])
    for key in ("device", "cpu", "torch", "started_utc"):
        assert key in results["machine"]


def test_the_suite_sections_run_the_tests_on_the_device_and_record_each(smoke):
    sections = smoke[0]["sections"]
    for name, files in gpu_check.SUITE_TESTS.items():
        summary, rows = sections[name]["summary"], sections[name]["rows"]
        assert summary["command"].startswith("python -m pytest -q --device=cpu -m device")
        assert summary["exit_status"] == 0 and not summary["timed_out"] and summary["wall_s"] > 0
        assert summary["passed"] == len(rows) > 0 and summary["failed"] == summary["error"] == 0
        assert all(r["outcome"] == "passed" and r["duration_s"] >= 0 for r in rows)
        assert {r["test"].split("::")[0] for r in rows} <= {f.removeprefix("tests/") for f in files}
    golden = {r["test"].split("[")[-1] for r in sections["golden"]["rows"]}
    assert golden == {"escrealm_conv_x1_unshuffle-naive]", "escrealm_conv_x1_unshuffle-sdpa]"}
    assert any("half_precision" in r["test"] for r in sections["precision"]["rows"])
    assert any("training_backward" in r["test"] for r in sections["training_step"]["rows"])


def test_sections_report_what_the_gpu_run_needs(smoke):
    sections = smoke[0]["sections"]

    kernels = sections["attention_kernels"]
    assert {p["mode"] for p in kernels["probes"]} == {"inference", "training"}
    assert all(r.get("ops") for r in kernels["rows"])
    sdpa = sections["sdpa_kernels"]
    assert {r["kernel"] for r in sdpa["rows"]} >= {"default", "MATH"}
    assert all("median_ms" in r or r["unsupported"] for r in sdpa["rows"])
    assert sdpa["summary"]["fastest"]

    assert all(r["compiled"] in (True, False) and "flex_ms" in r for r in sections["flex_compiled"]["rows"])

    attention = {r["backend"]: r for r in sections["window_attention"]["rows"]}
    assert attention["naive"]["speedup_vs_naive"] == 1.0 and "speedup_vs_naive" in attention["sdpa"]
    assert sections["window_attention"]["summary"]["paper"] == gpu_check.PAPER_WINDOW_ATTENTION

    latency = sections["latency"]["rows"]
    assert {r["backend"] for r in latency} == {"sdpa", "flex", "naive"}
    assert all(r["median_ms"] > 0 and r["output"] == "64x64" for r in latency)

    tiles = {r["run"]: r for r in sections["auto_tile"]["rows"]}
    forced = tiles["tile='auto' fp32, forced memory limit"]
    assert forced["oom_halvings"] >= 1 and forced["within_1_255"]
    assert tiles["tile='auto' fp32"]["within_1_255"]


def test_markdown_has_a_summary_and_a_part_per_section(smoke):
    results, markdown = smoke
    assert markdown.startswith("# GPU check:")
    for name in results["sections"]:
        assert f"| {name} | ok |" in markdown or f"| {name} | skipped |" in markdown
        assert f"## {name}: " in markdown
    assert "| test | outcome | s |" in markdown  # the suite sections' tests
    assert "| preset | scale | LR | backend | dtype | median ms |" in markdown


def test_the_suite_plugin_records_each_test_once_with_why_it_failed_or_skipped(tmp_path, monkeypatch):
    from benchmarks import suite

    record = tmp_path / "tests.jsonl"
    monkeypatch.setenv(suite.RECORD_ENV, str(record))
    crash = SimpleNamespace(reprcrash=SimpleNamespace(message="AssertionError: 0.002 <= 0.0001\nwhere ..."))
    phases = [("tests/test_a.py::test_fails", "setup", "passed", None), ("tests/test_a.py::test_fails", "call", "failed", crash),
              ("tests/test_a.py::test_fails", "teardown", "passed", None),
              ("tests/test_a.py::test_skips", "setup", "skipped", ("test_a.py", 3, "Skipped: no CUDA")),
              ("tests/test_a.py::test_skips", "teardown", "passed", None)]
    for nodeid, when, outcome, longrepr in phases:
        suite.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, when=when, duration=0.25, longrepr=longrepr,
                                                       failed=outcome == "failed", skipped=outcome == "skipped"))
    rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {"test": "test_a.py::test_fails", "outcome": "failed", "duration_s": 0.75, "message": "AssertionError: 0.002 <= 0.0001"},
        {"test": "test_a.py::test_skips", "outcome": "skipped", "duration_s": 0.5, "message": "Skipped: no CUDA"},
    ]


def test_a_suite_run_that_pytest_refuses_or_that_overruns_says_so():
    from benchmarks import suite

    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    refused = suite.run_tests(("tests/test_models.py",), device="cuda", timeout_s=300, env=no_gpu)
    assert refused["exit_status"] == 4 and refused["passed"] == 0 and not refused["timed_out"]
    assert any("--device cuda" in line for line in refused["output_tail"])
    stopped = suite.run_tests(("tests/test_models.py",), device="cpu", timeout_s=1, env=no_gpu)
    assert stopped["timed_out"] and stopped["exit_status"] != 0 and stopped["rows"] == []


def test_paper_sizes_follow_the_spec():
    assert [gpu_check.paper_lr_size(s) for s in (2, 3, 4)] == [(360, 640), (240, 426), (180, 320)]
    full = gpu_check.make_plan(smoke=False)
    assert full.latency_runs == (100, 100) and full.window_attention["runs"] == (100, 100)
    assert set(gpu_check.PAPER_TABLE2) == {(p, s) for p in full.latency_presets for s in (2, 3, 4)}


def test_short_budget_skips_heavy_sections_with_a_reason(tmp_path):
    proc = run_check("--smoke", "--out", str(tmp_path), "--budget-s", "0", "--only", "environment", "latency", "auto_tile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = results_of(tmp_path)[0]["sections"]
    assert sections["environment"]["status"] == "ok"
    for name in ("latency", "auto_tile"):
        assert sections[name]["status"] == "skipped" and "budget" in sections[name]["reason"]


def test_crashing_and_hanging_sections_are_recorded_and_the_rest_runs(tmp_path):
    fault = {"ESC_GPU_CHECK_FAULT": "environment=hang,attention_kernels=crash,precision=raise"}
    proc = run_check("--smoke", "--out", str(tmp_path), "--cap-s", "20", "--only", "environment", "attention_kernels",
                     "precision", "sdpa_kernels", env=fault)
    assert proc.returncode == 1
    results, markdown = results_of(tmp_path)
    sections = results["sections"]
    assert sections["environment"]["status"] == "error" and "cap" in sections["environment"]["error"]
    assert sections["attention_kernels"]["status"] == "error" and "SIGSEGV" in sections["attention_kernels"]["error"]
    assert sections["precision"]["status"] == "error" and "injected fault" in sections["precision"]["error"]
    assert sections["sdpa_kernels"]["status"] == "ok"
    assert results["finished"] and "| attention_kernels | error |" in markdown


def test_refuses_without_cuda_in_one_line(tmp_path):
    proc = run_check("--out", str(tmp_path))
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_pack_golden_copies_cases_that_fit_an_upload(tmp_path):
    golden = gpu_check.DEFAULT_GOLDEN
    proc = run_check("--pack-golden", str(tmp_path / "g"), "--golden", str(golden))
    assert proc.returncode == 0, proc.stderr
    packed = gpu_check.Golden(tmp_path / "g")
    listed = json.loads((golden / "cases.json").read_text())["cases"]
    assert set(packed.cases) == {c["id"] for c in listed} - set(gpu_check.PACK_SKIP)
    assert sum(f.stat().st_size for f in (tmp_path / "g").iterdir()) < 56e6
