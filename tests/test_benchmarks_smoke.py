"""Smoke test of the benchmark scripts: the quick path runs end to end on tiny sizes and writes a results
file, a plot and a README section of the expected shape; ``python -m benchmarks <subcommand>`` reaches every script.

It checks structure, never timings (those belong to ``python -m benchmarks.run_all``, not to tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

# The plot needs matplotlib and the peer models spandrel: both come with esc-sr[bench] (in [all]).
from benchmarks import report, run_all  # noqa: E402
from benchmarks.common import parse_size, peak_rss_bytes, reset_peak_rss  # noqa: E402
from benchmarks.peak_memory import run_case  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written text that must survive.\n", encoding="utf-8")
    assert run_all.main(["--smoke", "--out", str(out), "--readme", str(readme)]) == 0
    [json_path] = list(out.glob("*-smoke.json"))
    return out, readme, json.loads(json_path.read_text(encoding="utf-8"))


def test_results_file_describes_the_machine_and_the_load(smoke_run):
    _, _, results = smoke_run
    assert results["profile"] == "smoke"
    machine = results["machine"]
    for key in ("device", "cpu", "logical_cpus", "torch", "torch_threads", "load_average_at_start"):
        assert key in machine
    assert results["threads"]["used"] >= 1 and results["threads"]["reason"]
    assert len(results["load_average_at_end"]) == 3
    assert results["wall_s"] > 0


def test_model_table_rows_have_latency_memory_and_ratios(smoke_run):
    _, _, results = smoke_run
    rows = results["model_table"]["rows"]
    assert {r["model"] for r in rows} == {"ESC-light", "SAFMN"}
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["runs"] == 1 and row["median_ms"] > 0
        assert len(row["times_ms"]) == row["runs"]
        assert row["params"] > 0
        assert row["output_shape"] == [1, 3, 128, 128]  # x4 of the 32x32 input
        assert "peak_mb" in row and "latency_vs_esc" in row and "memory_vs_esc" in row
    esc = next(r for r in rows if r["model"] == "ESC-light")
    assert esc["family"] == "ours" and esc["default_backend"] and esc["paper"]["urban100_psnr"] == 26.76


def test_window_attention_compares_backends_against_naive(smoke_run):
    _, _, results = smoke_run
    attention = results["window_attention"]
    assert attention["paper"] == {"latency_ratio": 16.0, "memory_ratio": 12.2, "note": attention["paper"]["note"]}
    by_backend = {r["backend"]: r for r in attention["rows"]}
    assert set(by_backend) == {"naive", "sdpa"}
    assert by_backend["naive"]["speedup_vs_naive"] == 1.0
    assert by_backend["sdpa"]["sdpa_kernel"]


def test_scaling_covers_tiled_and_untiled_with_linear_fits(smoke_run):
    _, _, results = smoke_run
    scaling = results["scaling"]
    modes = {r["mode"] for r in scaling["rows"]}
    assert modes == {"untiled", "tile 16"}
    assert all("error" not in r and r["median_ms"] > 0 for r in scaling["rows"])
    assert set(scaling["fits"]) == modes
    assert scaling["fits"]["untiled"]["latency_ms"]["slope_per_pixel"] is not None


def test_training_step_runs_in_a_fresh_process(smoke_run):
    _, _, results = smoke_run
    [row] = results["training"]["rows"]
    assert "error" not in row, row.get("error")
    assert row["backend"] == "sdpa" and row["batch"] == 1 and row["s_per_iter"] > 0
    assert row["peak_rss_mb"] > row["peak_mb"] > 0  # a real child process: RSS includes the libraries


def test_flops_are_counted_and_compared_with_matmul(smoke_run):
    _, _, results = smoke_run
    flops = results["flops"]
    assert flops["forward_gflop"] > 0 and flops["matmul_gflops"] > 0
    assert set(flops["forward_gflop_by_op"]) >= {"convolution", "bmm"}
    assert 0 < flops["fraction_of_matmul"] == pytest.approx(flops["achieved_gflops"] / flops["matmul_gflops"], rel=0.01)


def test_targets_plot_and_readme_are_generated_from_the_results(smoke_run):
    out, readme, results = smoke_run
    names = [t["target"] for t in results["targets"]]
    assert any("window attention >= 5x faster" in n for n in names)
    assert all(set(t) == {"target", "value", "threshold", "met", "detail"} for t in results["targets"])
    png = out / results["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    text = readme.read_text(encoding="utf-8")
    assert "Hand-written text that must survive." in text
    assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1
    assert "| ESC-light | sdpa (default) |" in text or "| ESC-light |" in text


def test_one_entry_point_lists_every_script_with_the_first_line_of_its_docstring():
    from benchmarks.__main__ import subcommands

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands = subcommands()
    assert {"run_all", "report", "gpu_check", "window_attention", "official_cpu", "chainner_hook_startup"} <= set(commands)
    assert not {"common", "models", "suite", "degradations"} & set(commands)  # shared code, no main()
    for name, summary in commands.items():
        assert summary and f"  {name} " in proc.stdout and summary in proc.stdout, name
    assert commands["run_all"] == "Rerun every benchmark on this machine and write the report."


def test_a_subcommand_runs_that_scripts_main_and_the_old_module_form_still_works(tmp_path, capsys):
    from benchmarks.__main__ import main

    assert main(["report", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 1
    assert "no full results file" in capsys.readouterr().out
    assert main(["no_such_benchmark"]) == 2
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--results" in proc.stdout


def test_a_failing_case_is_reported_not_raised():
    result = run_case({"workload": "benchmarks.no_such_module:workload", "device": "cpu"})
    assert "error" in result and "no_such_module" in result["error"]


def test_peak_rss_can_be_reset_to_measure_only_the_timed_runs():
    before = peak_rss_bytes()
    blob = bytearray(64 * 2**20)  # touch 64 MiB, then free it
    del blob
    assert peak_rss_bytes() >= before
    if reset_peak_rss():  # Linux: VmHWM drops back to the current RSS
        assert peak_rss_bytes() < before + 64 * 2**20


def test_sizes_parse_as_height_by_width():
    assert parse_size("180x320") == (180, 320)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_size("180")


def test_onnx_speed_writes_both_runtimes_their_ratio_and_the_load(tmp_path, capsys):
    from benchmarks import onnx_speed

    out = tmp_path / "onnx_speed.json"
    assert onnx_speed.main(["--preset", "esc_tiny", "--size", "24x40", "--runs", "2", "--note", "smoke", "--out", str(out)]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    result = results["result"]
    assert set(result["times_ms"]) == {"pytorch", "onnxruntime"} and all(len(v) == 2 for v in result["times_ms"].values())
    assert result["output_shape"] == [1, 3, 96, 160] and result["max_abs_diff_at_size"] <= 1e-4
    assert result["onnxruntime_over_pytorch"] > 0 and result["threads"]["onnxruntime_intra_op"] == 1
    assert results["note"] == "smoke" and len(results["load_average_at_end"]) == 3
    assert "onnxruntime / PyTorch" in capsys.readouterr().out


def test_official_cpu_without_the_clone_skips_only_the_official_row(tmp_path):
    """No clone of dslisleedh/ESC: the benchmark says so and still times ours (all three entries) in its workers."""
    from benchmarks import official_cpu

    assert official_cpu.main(["--official-repo", str(tmp_path / "no-clone"), "--size", "16x24", "--runs", "1",
                              "--conditions", "idle", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "official_cpu.json").read_text(encoding="utf-8"))
    assert "no clone of dslisleedh/ESC" in results["official_skipped"]
    idle = results["conditions"]["idle"]
    assert set(idle["seconds"]) == {"ours_upscale", "ours_batch", "ours_bare"} and "ratio_vs_official" not in idle
    assert len(idle["thread_decisions"]["ours_upscale"]) == len(idle["thread_decisions"]["ours_batch"]) == 1
    assert "Official row skipped" in (tmp_path / "official_cpu.md").read_text(encoding="utf-8")


def test_large_kernel_benchmark_compares_fft_and_direct_with_their_errors(tmp_path):
    from benchmarks import large_kernel

    out = tmp_path / "large_kernel.json"
    assert large_kernel.main(["--rounds", "2", "--size", "128x128", "--out", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["what"].split(",")[0] for r in rows] == ["correlation"] * 3 + ["forward"] * 2
    for row in rows:
        assert row["fft_over_direct"]["median"] > 0
    assert all(r["max_abs_error_vs_float64"]["fft"] < 1e-4 for r in rows[:3])
    assert all(r["max_abs_difference"] < 1e-4 for r in rows[3:])
    assert "FFT / direct" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_streamed_tiling_benchmark_times_each_mode_in_its_own_process(tmp_path):
    from benchmarks import streamed_tiling

    out = tmp_path / "streamed.json"
    assert streamed_tiling.main(["--size", "64", "--tile", "32", "--modes", "untiled", "streamed", "--threads", "1",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in rows] == ["untiled", "streamed"]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert "| streamed |" in out.with_suffix(".md").read_text()


def test_memory_estimate_benchmark_compares_estimate_and_measured_slope(tmp_path):
    from benchmarks import memory_estimate

    out = tmp_path / "memory.json"
    assert memory_estimate.main(["--variants", "esc_tiny:4", "--sizes", "32", "48", "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())["results"]
    assert row["measured_bytes_per_pixel"] > 0 and row["estimate_over_measured"] == pytest.approx(
        row["estimate_bytes_per_pixel"] / row["measured_bytes_per_pixel"], rel=0.01)
    assert row["measured_bytes_per_pixel_heap_policy"] > 0  # the same upscale, with esc_sr.heap's reuse
