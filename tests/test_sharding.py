"""``esc-sr upscale`` on several processes: ``torchrun --nproc_per_node=N`` shares the files between them.

    torchrun --standalone --nproc_per_node=2 --no-python esc-sr upscale in/ -o out/

Rank 0 plans the batch (inputs, output names, collisions) and gives each file to exactly one rank, balancing
their pixels; every rank loads the model once and upscales its files, reporting its own failures; rank 0 prints
the one summary and returns the run's exit status (1 if a file failed on any rank).

The first two tests are real runs: the ``torchrun`` launcher starting two CPU processes of the installed ``esc-sr``
console script, with the embedded default model, on small images in ``tmp_path``. torchrun's ``--log-dir`` keeps
each rank's stderr apart, which shows who said what. The others test the parts (:mod:`esc_sr.sharding`) in-process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from esc_sr import cli, sharding
from esc_sr.batch import Job, Summary
from esc_sr.sharding import Launch, Session, ShardingError, assign, cpu_threads, detect_launch

REPO_ROOT = Path(__file__).resolve().parents[1]
ESC_SR = shutil.which("esc-sr", path=str(Path(sys.executable).parent)) or shutil.which("esc-sr")
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))

needs_console_script = pytest.mark.skipif(ESC_SR is None, reason="the esc-sr console script is not installed")


def _image(path: Path, height: int, width: int, mode: str = "RGB") -> Path:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(height * 100 + width + channels)
    pixels = (rng.random((height, width, channels)) * 255).astype(np.uint8)
    PILImage.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
    return path


def _torchrun(*upscale_args: object, cwd: Path) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """Run ``torchrun --nproc_per_node=2 esc-sr upscale ...`` in ``cwd``: (the process, each rank's stderr).

    ``--standalone`` picks a free port (tests may run side by side); ``--tee 3`` shows each rank's output as usual
    and also writes it under ``--log-dir``. OMP_NUM_THREADS=1 keeps the run light on a shared machine (it would
    be overridden by each rank's share of the cores: see test_each_process_gets_its_share_of_the_cores).
    """
    launcher = [TORCHRUN] if TORCHRUN else [sys.executable, "-m", "torch.distributed.run"]
    logs = cwd / "torchrun-logs"
    env = {k: v for k, v in os.environ.items() if k not in (*sharding.LAUNCH_VARIABLES, "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    proc = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--tee", "3",
         "--no-python", ESC_SR, "upscale", *map(str, upscale_args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    ranks = {int(log.parent.name): _without_torch_logs(log.read_text()) for log in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(ranks) == [0, 1], (proc.stdout, proc.stderr)
    return proc, ranks


def _without_torch_logs(text: str) -> str:
    """esc-sr's lines only: some hosts add c10d's log lines (``[W1202 01:02:03 ... socket.cpp:...] ...``)."""
    return "".join(line for line in text.splitlines(keepends=True) if not re.match(r"\[?[WIE]\d{4} |\[[WIE] ", line))


def _planned_ranks(files: list[Path], *, failed_at_once: tuple[str, ...] = ()) -> dict[str, int]:
    """The rank esc-sr gives each file, computed here as rank 0 computes it: its pixels (a job that fails at once,
    such as the second input of a collision, costs 1), split by :func:`esc_sr.sharding.assign`."""
    costs = [1 if f.name in failed_at_once else sharding.estimate_cost(f) for f in files]
    return {f.name: rank for f, rank in zip(files, assign(costs, 2))}


def _pixels(path: Path) -> np.ndarray:
    with PILImage.open(path) as image:
        return np.asarray(image).astype(np.int16)


# ---------------------------------------------------------------------------------------------- real runs


@needs_console_script
def test_two_processes_share_the_files_and_rank_0_prints_one_summary(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name, (height, width, mode) in {"photo.png": (32, 32, "RGB"), "wide.png": (24, 40, "RGB"),
                                        "scan.png": (32, 28, "L"), "logo.png": (28, 28, "RGBA"),
                                        "tiny.png": (16, 16, "RGB")}.items():
        _image(src / name, height, width, mode)
    plan = _planned_ranks(sorted(src.iterdir()))
    assert sorted(set(plan.values())) == [0, 1], plan  # both processes have files to do

    proc, ranks = _torchrun("in", "-o", "out", cwd=tmp_path)
    output = proc.stdout + proc.stderr

    assert proc.returncode == 0, output
    # One summary, from rank 0; 5 written for 5 inputs: each file was done once (twice would count twice).
    summaries = [line for line in output.splitlines() if "esc-sr upscale:" in line]
    assert len(summaries) == 1 and summaries[0].endswith("esc-sr upscale: 5 written, 0 failed"), output
    assert ranks == {0: "esc-sr upscale: 5 written, 0 failed\n", 1: ""} and "Traceback" not in output
    # The same files as one process writes, with the same pixels (byte for byte here; within 1/255 allowed).
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "single"), "-q"]) == 0
    assert "5 written, 0 failed" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names == [
        "logo_x4.png", "photo_x4.png", "scan_x4.png", "tiny_x4.png", "wide_x4.png"]
    for name in names:
        ours, single = tmp_path / "out" / name, tmp_path / "single" / name
        if ours.read_bytes() != single.read_bytes():
            assert np.abs(_pixels(ours) - _pixels(single)).max() <= 1, name


@needs_console_script
def test_a_bad_file_on_rank_1_fails_alone_and_makes_the_run_fail(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.png", 40, 40)
    _image(src / "b.png", 32, 32)
    _image(src / "c.png", 24, 32)
    (src / "notes.png").write_text("not an image")
    _image(src / "shot.jpg", 24, 24)
    _image(src / "shot.png", 24, 24)  # with --ext png, shot.jpg and shot.png both want out/shot_x4.png
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x4.png").write_bytes(b"from an earlier run")  # kept: a rerun resumes, as on one process

    plan = _planned_ranks(sorted(src.iterdir()), failed_at_once=("shot.png",))
    assert plan == {"a.png": 0, "shot.jpg": 0, "b.png": 1, "c.png": 1, "notes.png": 1, "shot.png": 1}

    proc, ranks = _torchrun("in", "-o", "out", "--ext", "png", cwd=tmp_path)
    output = proc.stdout + proc.stderr

    assert proc.returncode != 0, output  # torchrun exits 1 when a worker does: here rank 0, with the run's status
    # Each rank reports its own files, once: rank 1 the bad file and the collision (its partner is on rank 0:
    # collisions are decided on the whole plan), rank 0 the output it skipped.
    assert ranks[1].splitlines() == [
        "in/notes.png: not a recognised image format (or the file is corrupt)",
        "in/shot.png: output out/shot_x4.png would also be written for in/shot.jpg; rename one or use --suffix",
    ]
    assert ranks[0].splitlines()[0] == "out/a_x4.png: skipped, output exists (use --overwrite to replace it)"
    # Rank 0's summary counts the failures of rank 1, in the order of the inputs.
    assert ranks[0].splitlines()[1:] == [
        "esc-sr upscale: 3 written, 1 skipped (output exists), 2 failed",
        "failed:",
        "  in/notes.png: not a recognised image format (or the file is corrupt)",
        "  in/shot.png: output out/shot_x4.png would also be written for in/shot.jpg; rename one or use --suffix",
    ]
    assert output.count("esc-sr upscale:") == 1 and output.count("in/notes.png:") == 2  # its line, its summary entry
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "b_x4.png", "c_x4.png", "shot_x4.png"]
    assert (out / "a_x4.png").read_bytes() == b"from an earlier run"
    with PILImage.open(out / "shot_x4.png") as shot:  # from shot.jpg, the first of the two
        assert shot.size == (96, 96)


# ------------------------------------------------------------------------------------ the split of the files


def test_each_file_goes_to_exactly_one_rank_largest_first():
    # Longest first: 9 to rank 0, 5 and 4 to rank 1 (then 9 each), 3 to rank 0, 2 and 1 to rank 1.
    assert assign([4, 9, 2, 5, 1, 3], 2) == [1, 0, 1, 1, 1, 0]
    costs = list(range(1, 101))
    for world in (1, 2, 3, 7, 150):
        ranks = assign(costs, world)
        assert len(ranks) == len(costs) and set(ranks) <= set(range(world))
        loads = [sum(c for c, r in zip(costs, ranks) if r == rank) for rank in range(world)]
        assert max(loads) - min(loads) <= max(costs), (world, loads)  # never more than one file apart
    assert assign(costs, 3) == assign(list(costs), 3)  # deterministic: every rank would compute the same


def test_equal_costs_are_dealt_round_robin_and_free_files_are_spread_too():
    assert assign([7] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign([0, 0, 0, 0], 2) == [0, 1, 0, 1]  # a file that fails at once still goes somewhere, evenly
    assert assign([5], 4) == [0] and assign([], 3) == []  # more ranks than files: the others have none
    with pytest.raises(ValueError):
        assign([1], 0)


def test_the_cost_of_a_file_is_its_pixels_from_the_header(tmp_path):
    assert sharding.estimate_cost(_image(tmp_path / "a.png", 30, 40)) == 1200
    (tmp_path / "odd.png").write_text("not an image")  # no header Pillow knows: maybe a format only OpenCV reads
    assert sharding.estimate_cost(tmp_path / "odd.png") == len("not an image")  # its bytes stand in for its pixels
    assert sharding.estimate_cost(tmp_path / "missing.png") == 1  # fails in a moment; and never raises


def test_the_summaries_of_the_ranks_merge_in_the_order_of_the_inputs():
    jobs = [Job(Path(f"in/{name}.png")) for name in "abcd"]
    rank0 = Summary(written=[Path("out/a.png")], failed=[("nothing/*.png", "no files match"), ("in/c.png", "bad")])
    rank1 = Summary(skipped=[Path("out/b.png")], failed=[("in/d.png", "bad"), ("in/b.png", "bad")])
    merged = Summary.merge([rank0, rank1], jobs)
    assert (len(merged.written), len(merged.skipped)) == (1, 1)
    assert [name for name, _ in merged.failed] == ["nothing/*.png", "in/b.png", "in/c.png", "in/d.png"]


# ------------------------------------------------------------------------------ the launch and the devices


TORCHRUN_RANK_1_OF_4 = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_the_launch_is_read_from_torchruns_variables():
    assert detect_launch({}) == Launch() and not Launch().distributed
    assert detect_launch(TORCHRUN_RANK_1_OF_4) == Launch(rank=1, world_size=4, local_rank=1, local_world_size=2)
    assert detect_launch({"RANK": "2", "WORLD_SIZE": "3"}) == Launch(2, 3, 2, 3)  # no LOCAL_*: one machine
    assert not detect_launch({"RANK": "0", "WORLD_SIZE": "1"}).distributed  # torchrun --nproc_per_node=1


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "inconsistent"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "not a whole number"),
])
def test_contradictory_launch_variables_are_refused(environ, message):
    with pytest.raises(ShardingError, match=message):
        detect_launch(environ)


def test_the_cli_reports_a_bad_launch_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["upscale", str(tmp_path), "-o", str(tmp_path / "out")]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == ("esc-sr upscale: error: WORLD_SIZE=2 is set but RANK is not: start the "
                                       "processes with torchrun\n")


def test_each_process_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    two_here = Launch(rank=1, world_size=4, local_rank=1, local_world_size=2)
    assert cpu_threads(two_here, None, {}) == 4  # 8 cores, 2 processes on this machine
    assert cpu_threads(two_here, None, {"OMP_NUM_THREADS": "1"}) == 4  # torchrun's default: not the user's
    assert cpu_threads(two_here, None, {"OMP_NUM_THREADS": "3"}) is None  # the user's: torch reads it
    assert cpu_threads(two_here, 2, {}) == 2  # --threads 2
    assert cpu_threads(Launch(0, 16, 0, 16), None, {}) == 1  # at least 1
    assert cpu_threads(Launch(), None, {}) is None  # one process: torch's default


def test_each_process_gets_its_own_gpu(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    rank_3 = Session(Launch(rank=3, world_size=4, local_rank=3, local_world_size=4))
    assert rank_3.device("auto") == "cuda:1" and rank_3.device("cuda") == "cuda:1"  # 4 processes, 2 GPUs
    assert chosen == [1, 1]
    assert rank_3.device("cpu") == "cpu" and rank_3.device("cuda:0") == "cuda:0"  # the user's choice stands
    assert Session().device("auto") == "auto"  # one process: the engine's own choice


def test_one_process_is_a_session_without_a_group():
    session = Session.start({})
    assert session.is_root and session.label == "" and session._group is None
    assert session.from_root(lambda: 5, exit_status=int) == 5
    assert session.split(lambda: ["a", "b"], cost=None, exit_status=int) == (["a", "b"], ["a", "b"])
    assert session.gather("mine") == ["mine"]
    session.close()


def test_the_other_ranks_stay_quiet_when_rank_0_fails_a_step(monkeypatch, tmp_path, capsys):
    """Rank 0 reports a usage error (here: no input) and exits 2; rank 1, waiting for the plan, is told so and
    exits with the same status, silently: the reason is printed once. (Simulated: rank 1's side of the exchange.)"""
    rank_1 = Session(Launch(rank=1, world_size=2, local_rank=1, local_world_size=2))
    monkeypatch.setattr(rank_1, "_broadcast", lambda value: (False, cli.EXIT_USAGE))
    monkeypatch.setattr(Session, "start", classmethod(lambda cls, environ=None: rank_1))
    assert cli.main(["upscale", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ a stopped rank (issue 26)


@pytest.mark.parametrize("text, seconds", [("", 7 * 86400), ("90", 90), ("30m", 1800), ("2H", 7200), ("1.5d", 129600),
                                           (" 45 s ", 45)])
def test_how_long_a_rank_waits_is_configurable(text, seconds):
    assert sharding.exchange_timeout({"ESC_SR_RANK_WAIT": text}).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5", "10 min", "1e3"])
def test_a_wait_that_is_not_a_duration_is_refused_in_one_line(text):
    with pytest.raises(ShardingError, match=r"^ESC_SR_RANK_WAIT='.*' is not a duration \(seconds, or a number"):
        sharding.exchange_timeout({"ESC_SR_RANK_WAIT": text})


def test_the_exchange_group_waits_as_long_as_configured(monkeypatch):
    import torch.distributed as dist

    made = {}
    monkeypatch.setenv("ESC_SR_RANK_WAIT", "45m")
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: made.setdefault("startup", kwargs["timeout"]))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.setdefault("exchanges", kwargs["timeout"]) or "group")
    Session(Launch(rank=0, world_size=2, local_rank=0, local_world_size=2))._join()
    assert made == {"startup": sharding.STARTUP_TIMEOUT, "exchanges": sharding.datetime.timedelta(minutes=45)}


class FakeStore:
    """torchrun's store, as the ranks' check-ins use it."""

    def __init__(self):
        self.keys = set()

    def set(self, key, value):
        self.keys.add(key)

    def check(self, keys):
        return all(key in self.keys for key in keys)


def _waiting_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "waiting for" in line]


def test_a_rank_kept_waiting_says_for_whom_at_intervals(monkeypatch, capsys):
    """Issue 26: a stopped (not dead) rank made the others wait silently for up to 7 days. Rank 0 of 3 gathers the
    summaries; rank 2 has checked in, rank 1 is stopped (the fake collective holds until released): rank 0 says,
    at each interval, that it is waiting for rank 1, and how long it may wait. Rank 1, waiting for a broadcast, names
    rank 0."""
    import threading

    import torch.distributed as dist

    monkeypatch.setattr(sharding, "FIRST_REPORT_S", 0.05)
    monkeypatch.setattr(sharding, "REPORT_EVERY_S", 0.05)
    store = FakeStore()
    monkeypatch.setattr(Session, "_store", lambda self: store)
    rank_0 = Session(Launch(rank=0, world_size=3, local_rank=0, local_world_size=3))
    rank_0._group, rank_0._timeout = "group", sharding.exchange_timeout({"ESC_SR_RANK_WAIT": "2h"})

    def gather_object(value, parts, dst, group):
        store.set("esc-sr/exchange-1/rank-2", "here")  # rank 2 arrives; rank 1 never does, until released
        threading.Event().wait(0.4)
        parts[:] = [value, "one", "two"]

    monkeypatch.setattr(dist, "gather_object", gather_object)
    assert rank_0.gather("zero") == ["zero", "one", "two"]
    lines = _waiting_lines(capsys.readouterr().err)
    assert len(lines) >= 3, lines
    for line in lines:
        assert re.fullmatch(r"esc-sr upscale: rank 0 of 3: waiting for rank 1 for [0-9.]+ s; a rank that is stopped, "
                            r"not dead, holds the others up to 2 h \(ESC_SR_RANK_WAIT sets it\)", line), line

    rank_1 = Session(Launch(rank=1, world_size=3, local_rank=1, local_world_size=3))
    rank_1._group = "group"
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, group: threading.Event().wait(0.2))
    rank_1._broadcast(None)
    lines = _waiting_lines(capsys.readouterr().err)
    assert lines and all(line.startswith("esc-sr upscale: rank 1 of 3: waiting for rank 0 for ") for line in lines)


def test_an_exchange_answered_in_time_says_nothing(monkeypatch, capsys):
    import torch.distributed as dist

    monkeypatch.setattr(Session, "_store", lambda self: FakeStore())
    rank_0 = Session(Launch(rank=0, world_size=2, local_rank=0, local_world_size=2))
    rank_0._group = "group"
    monkeypatch.setattr(dist, "gather_object", lambda value, parts, dst, group: parts.__setitem__(slice(None), [1, 2]))
    assert rank_0.gather(1) == [1, 2]
    assert capsys.readouterr().err == ""


def test_giving_up_after_the_configured_wait_is_one_line_saying_so(monkeypatch):
    import torch.distributed as dist

    def timed_out(value, parts, dst, group):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for "
                           "recv operation to complete")

    monkeypatch.setattr(Session, "_store", lambda self: None)
    monkeypatch.setattr(dist, "gather_object", timed_out)
    rank_0 = Session(Launch(rank=0, world_size=2, local_rank=0, local_world_size=2))
    rank_0._group, rank_0._timeout = "group", sharding.exchange_timeout({"ESC_SR_RANK_WAIT": "5"})
    with pytest.raises(ShardingError) as caught:
        rank_0.gather(1)
    assert str(caught.value) == ("rank 0 of 2: gave up waiting for the other processes after 5 s (ESC_SR_RANK_WAIT); "
                                 "one of them is stopped or hung: see its messages")


def test_a_rank_kept_waiting_for_the_others_to_join_says_so(monkeypatch, capsys):
    """A rank stopped before it joins holds the others in the rendezvous (up to STARTUP_TIMEOUT): they say so."""
    import threading

    import torch.distributed as dist

    monkeypatch.setattr(sharding, "FIRST_REPORT_S", 0.05)
    monkeypatch.setattr(sharding, "REPORT_EVERY_S", 0.05)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: threading.Event().wait(0.3))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: "group")
    Session(Launch(rank=0, world_size=2, local_rank=0, local_world_size=2))._join()
    lines = _waiting_lines(capsys.readouterr().err)
    assert len(lines) >= 2 and all(re.fullmatch(r"esc-sr upscale: rank 0 of 2: waiting for the other ranks to join "
                                                r"for [0-9.]+ s \(at most 10 min\)", line) for line in lines), lines
