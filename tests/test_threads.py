"""esc_sr.threads: the per-call CPU thread count from fake machine readings, the user's settings winning, and
the wait policy set before torch loads. Fast: one subprocess (torch's real default), the rest in process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from esc_sr import threads
from esc_sr.sharding import Launch, Session


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch):
    """No user thread variables, no pin, no cached readings; torch's thread count restored afterwards."""
    for name in threads.THREAD_VARIABLES + threads.WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    threads.set_threads(None)
    monkeypatch.setattr(threads, "_cached", None)
    yield monkeypatch
    threads.set_threads(None)
    torch.set_num_threads(before)


def fake_machine(monkeypatch: pytest.MonkeyPatch, *, cpus: int, others: float | None, default: int) -> None:
    monkeypatch.setattr(threads, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "runnable_others", lambda: others)
    monkeypatch.setattr(threads, "torch_default_threads", lambda: default)


# ------------------------------------------------------------------------------------------- pure policy


@pytest.mark.parametrize("cpus, others, ceiling, expected", [
    (2, 0, 2, 2),     # idle 2-core machine: both cores
    (2, 1, 2, 1),     # one other job (e.g. a training run): the free core only
    (2, 3, 2, 1),     # oversubscribed: never below 1
    (8, 2, 8, 6),
    (16, 0, 8, 8),    # never above torch's default (physical cores; hyperthreads do not help)
    (8, 0.4, 8, 8),   # a container's fractional share rounds to the nearest thread
    (8, 0.5, 8, 7),
])
def test_choose_threads(cpus: int, others: float, ceiling: int, expected: int) -> None:
    assert threads.choose_threads(cpus, others, ceiling) == expected


def decide(**overrides):
    arguments = dict(current=2, default=2, cpus=2, others=1.0, pinned=None, environ={})
    arguments.update(overrides)
    return threads.decide(**arguments)


def test_decide_from_the_machine_state() -> None:
    assert decide(others=0.0).threads == 2
    assert decide(others=1.0).threads == 1
    chosen = decide(cpus=8, default=8, current=8, others=3.0)
    assert (chosen.threads, chosen.cpus, chosen.others) == (5, 8, 3.0)
    assert decide(others=None).threads is None  # no /proc: torch's default stays


@pytest.mark.parametrize("overrides", [
    dict(pinned=2),                                  # --threads 2 / the torchrun share, even at the default value
    dict(environ={"OMP_NUM_THREADS": "2"}),          # the user's environment, even at the default value
    dict(environ={"OMP_NUM_THREADS": "1"}),
    dict(environ={"MKL_NUM_THREADS": "4"}),
    dict(current=3),                                 # torch.set_num_threads(3) by the user
])
def test_user_settings_win(overrides) -> None:
    decision = decide(others=0.0, **overrides)
    assert decision.threads is None and ("user" in decision.reason or "application" in decision.reason)


def test_empty_variable_is_not_a_setting() -> None:
    assert decide(environ={"OMP_NUM_THREADS": " "}, others=0.0).threads == 2


# ------------------------------------------------------------------------------------------ readings


def test_runnable_others_median_minus_own(monkeypatch: pytest.MonkeyPatch) -> None:
    totals = iter([4, 9, 4, 3, 4])  # one blip (9) and one dip (3): the median ignores them
    monkeypatch.setattr(threads, "_runnable_total", lambda: next(totals))
    monkeypatch.setattr(threads, "_own_running", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.runnable_others(samples=5, interval=0) == 3.0


def test_runnable_others_in_a_cpuset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_runnable_total", lambda: 33)
    monkeypatch.setattr(threads, "_own_running", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.runnable_others(samples=1, interval=0) == pytest.approx(32 * 4 / 64)  # spread over 64 CPUs


def fake_cgroup(tmp_path, version: int, limit: str | None) -> tuple[str, str]:
    """``(/proc/self/cgroup, /sys/fs/cgroup)`` of a container, v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    if version == 2:
        proc.write_text("0::/docker/abc\n")
        (root / "docker" / "abc").mkdir(parents=True)
        (root / "docker" / "abc" / "cpu.max").write_text(f"{limit or 'max'} 100000\n")
    else:
        proc.write_text("4:cpu,cpuacct:/docker/abc\n")
        (root / "cpu").mkdir(parents=True)
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{limit or -1}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    return str(proc), str(root)


@pytest.mark.parametrize("version", [2, 1])
def test_cgroup_quota_is_read_from_either_cgroup_version(tmp_path, version: int) -> None:
    assert threads._cgroup_quota(*fake_cgroup(tmp_path / "limited", version, "400000")) == 4.0
    assert threads._cgroup_quota(*fake_cgroup(tmp_path / "free", version, None)) is None


@pytest.mark.parametrize("version", [2, 1])
def test_a_cpu_quota_container_counts_only_its_share_of_the_hosts_runnable_threads(
        tmp_path, monkeypatch: pytest.MonkeyPatch, version: int) -> None:
    """Issue 26: ``docker --cpus 4`` on a 64-core host (every CPU in its affinity mask), 4 threads runnable elsewhere
    on the host: /proc/loadavg counts the host, so those 4 are spread over 64 CPUs and 4/64 of them compete for this
    container's 4 CPUs; the call gets 4 threads, not 1 (the count before, when only a cpuset was scaled)."""
    paths = fake_cgroup(tmp_path, version, "400000")
    read_quota = threads._cgroup_quota
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: read_quota(*paths))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(threads, "_runnable_total", lambda: 4 + 1)  # 4 elsewhere on the host, and this thread
    monkeypatch.setattr(threads, "_own_running", lambda: 1)
    cpus, others = threads.usable_cpus(), threads.runnable_others(samples=1, interval=0)
    assert cpus == 4 and others == pytest.approx(4 * 4 / 64)
    decision = threads.decide(current=32, default=32, cpus=cpus, others=others, pinned=None, environ={})
    assert decision.threads == 4
    # The same 4 others with no quota and a 4-CPU cpuset: the same share, the same decision.
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads.runnable_others(samples=1, interval=0) == pytest.approx(4 * 4 / 64)
    # A quota bounds the share also inside a larger cpuset (8 CPUs, --cpus 2).
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.runnable_others(samples=1, interval=0) == pytest.approx(4 * 2 / 64)


def test_runnable_others_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "_runnable_total", lambda: None)
    assert threads.runnable_others(samples=3, interval=0) is None


def test_own_running_counts_this_thread() -> None:
    assert threads._own_running() >= 1
    assert threads._runnable_total() >= 1


def test_usable_cpus_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.usable_cpus() == 6
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.5)  # cpu.max "250000 100000"
    assert threads.usable_cpus() == 3
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 0.2)
    assert threads.usable_cpus() == 1


def test_torch_default_matches_a_fresh_torch() -> None:
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_VARIABLES}
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, check=True, timeout=120)
    assert int(fresh.stdout.split()[-1]) == threads.torch_default_threads()


# ------------------------------------------------------------------------------------------- applied


def test_policy_sets_and_restores(clean: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(3)
    fake_machine(clean, cpus=4, others=2.0, default=3)
    with threads.policy("cpu") as decision:
        assert decision.threads == 2 and torch.get_num_threads() == 2
        with threads.policy("cpu"):  # nested (e.g. gray through RGB): no second decision
            assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    assert threads.last_decision()["threads"] == 2


def test_policy_leaves_the_users_torch_setting(clean: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    fake_machine(clean, cpus=4, others=3.0, default=4)  # 2 is not torch's default: the user's
    with threads.policy("cpu") as decision:
        assert decision.threads is None and torch.get_num_threads() == 2


def test_policy_leaves_the_users_environment(clean: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(4)
    fake_machine(clean, cpus=4, others=3.0, default=4)
    clean.setenv("OMP_NUM_THREADS", "4")
    with threads.policy("cpu") as decision:
        assert decision.threads is None and torch.get_num_threads() == 4


def test_pinned_threads_win(clean: pytest.MonkeyPatch) -> None:
    fake_machine(clean, cpus=4, others=3.0, default=4)
    threads.set_threads(4)  # --threads 4: equal to the default, still the user's
    with threads.policy("cpu") as decision:
        assert decision.threads is None and torch.get_num_threads() == 4
    threads.set_threads(None)
    with threads.policy("cpu") as decision:
        assert decision.threads == 1


def test_session_pins_cli_threads(clean: pytest.MonkeyPatch) -> None:
    fake_machine(clean, cpus=4, others=3.0, default=4)
    assert Session(Launch()).set_threads(3, "cpu") == 3  # --threads 3
    assert torch.get_num_threads() == 3
    with threads.policy("cpu") as decision:
        assert decision.threads is None
    threads.set_threads(None)
    torch.set_num_threads(4)
    assert Session(Launch()).set_threads(None, "cpu") is None  # one process, no --threads: per call
    with threads.policy("cpu") as decision:
        assert decision.threads == 1


def test_accelerator_calls_untouched(clean: pytest.MonkeyPatch) -> None:
    fake_machine(clean, cpus=4, others=3.0, default=torch.get_num_threads())
    with threads.policy("meta") as decision:
        assert decision.threads is None


def test_readings_reused_briefly(clean: pytest.MonkeyPatch) -> None:
    calls = []
    clean.setattr(threads, "usable_cpus", lambda: 4)
    clean.setattr(threads, "runnable_others", lambda: calls.append(1) or 0.0)
    threads._readings()
    threads._readings()
    assert len(calls) == 1
    clean.setattr(threads, "REUSE_S", 0.0)
    threads._readings()
    assert len(calls) == 2


def test_set_threads_rejects_zero() -> None:
    with pytest.raises(ValueError):
        threads.set_threads(0)


# ------------------------------------------------------------------------------------------ waiting


def test_wait_policy_users_setting_wins() -> None:
    assert threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, cpus=8, torch_loaded=False) == {}
    assert threads.wait_policy({"GOMP_SPINCOUNT": "10000"}, cpus=8, torch_loaded=False) == {}


def test_wait_policy_too_late_once_torch_is_loaded() -> None:
    assert threads.wait_policy({}, cpus=8, torch_loaded=True) == {}
    environ: dict[str, str] = {}
    assert threads.configure_environment(environ) == {} and environ == {}  # this test process has torch


def test_wait_policy_one_cpu() -> None:
    assert threads.wait_policy({}, cpus=1, torch_loaded=False) == {}  # one thread: nothing waits


def test_wait_policy_several_cpus() -> None:
    assert threads.wait_policy({}, cpus=2, torch_loaded=False) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_cli_sets_the_wait_policy_before_torch() -> None:
    """esc-sr's entry sets it in a fresh process, before any handler imports torch (here ``info`` on a missing file)."""
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    code = ("import os, sys; from esc_sr import cli; status = cli.main(['info', '/nonexistent/x.pth']); "
            "print(status, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    status, policy, torch_loaded = done.stdout.split()[-3:]
    expected = threads.wait_policy({}, cpus=threads.usable_cpus(), torch_loaded=False).get("OMP_WAIT_POLICY")
    assert policy == str(expected) and status == "2"


def test_upscale_runs_the_model_under_the_policy(clean: pytest.MonkeyPatch) -> None:
    """esc_sr.upscale applies the policy to the model run and leaves torch's setting as it found it."""
    import esc_arch
    import esc_sr

    torch.set_num_threads(2)
    fake_machine(clean, cpus=2, others=1.0, default=2)
    torch.manual_seed(0)
    model = esc_arch.esc_tiny(scale=2).eval()
    seen: list[int] = []
    esc_arch.fuse(model).proj.register_forward_pre_hook(lambda module, inputs: seen.append(torch.get_num_threads()))
    out = esc_sr.upscale(model, torch.rand(1, 3, 12, 20))
    assert out.shape == (1, 3, 24, 40) and seen == [1] and torch.get_num_threads() == 2
    assert threads.last_decision()["threads"] == 1
