"""CPU threads of the model worker: the ceiling comes from the CPUs this process may use (not
the host's core count), the team shrinks while other processes keep cores busy, and
``model.num_threads`` pins it. ``/proc`` and cgroup files are faked, so the tests do not
depend on the machine or its load."""

from __future__ import annotations

import os

import pytest

from loopserve.core.model import cpu_threads as ct


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, quota):
    for name, text in files.items():
        _write(tmp_path / name, text)
    assert ct.cgroup_cpu_quota(str(tmp_path)) == quota


def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path):
    n = len(os.sched_getaffinity(0))
    assert ct.usable_cpus(str(tmp_path)) == (n, "affinity mask")
    _write(tmp_path / "cpu.max", "50000 100000\n")  # half a core: still one thread
    assert ct.usable_cpus(str(tmp_path)) == (1, "cgroup CPU quota 0.5")


@pytest.mark.parametrize("ceiling, busy, want", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.4, 1), (2, 1.0, 1), (2, 3.0, 1),
    (4, 1.0, 3), (4, 1.5, 2), (8, 0.1, 8), (1, 0.0, 1),
])
def test_threads_for_gives_up_one_thread_per_busy_core(ceiling, busy, want):
    assert ct.threads_for(ceiling, busy) == want


def _stat(busy_ticks: int, idle_ticks: int) -> str:
    # cpu0 and cpu1 split the ticks; cpu2 is outside the mask and must be ignored.
    half = busy_ticks // 2
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {half} 0 0 {idle_ticks} 0 0 0 0 0 0" for i in (0, 1)]
    lines.append("cpu2 999999 0 0 0 0 0 0 0 0 0")
    return "\n".join(lines) + "\n"


def _own(utime: int, stime: int) -> str:
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30
    return "123 (python (x)) " + " ".join(fields) + "\n"


def test_neighbours_busy_cores_is_the_others_cpu_time(tmp_path, monkeypatch):
    stat, own = tmp_path / "stat", tmp_path / "own"
    stat.write_text(_stat(0, 0))
    own.write_text(_own(0, 0))
    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr(ct.time, "monotonic", lambda: next(clock))
    n = ct._Neighbours([0, 1], str(stat), str(own))
    tick = n.tick
    # One second later: 1.5 cores busy in all, of which this process used 0.5 core.
    stat.write_text(_stat(int(1.5 * tick), 0))
    own.write_text(_own(int(0.25 * tick), int(0.25 * tick)))
    assert n.busy_cores() == pytest.approx(1.0, abs=0.05)
    # Another second: only this process ran.
    stat.write_text(_stat(int(2.5 * tick), 0))
    own.write_text(_own(int(0.75 * tick), int(0.75 * tick)))
    assert n.busy_cores() == pytest.approx(0.0, abs=0.05)


def test_explicit_num_threads_is_fixed_and_bad_values_are_rejected(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fixed = ct.CpuThreads(3)
    assert (fixed.choice.max_threads, fixed.choice.source, fixed.choice.adaptive) == (3, "model.num_threads", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ct.CpuThreads().choice.source == "OMP_NUM_THREADS"
    with pytest.raises(ValueError, match="model.num_threads must be >= 1"):
        ct.CpuThreads(0)


def test_adaptation_sets_the_team_size_on_the_calling_thread(monkeypatch):
    """With a neighbour busy on a core, the next forward runs with one thread fewer; set on
    every thread that runs passes (OpenMP keeps the size per thread)."""
    import threading

    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ct, "usable_cpus", lambda: (2, "affinity mask"))
    threads = ct.CpuThreads()
    assert threads.choice.adaptive

    class Busy:
        def busy_cores(self):
            return 1.0

    threads._neighbours = Busy()
    seen = []

    def run():
        threads.before_forward()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert seen == [1] and threads.choice.num_threads == 1 and threads.changes == 1
    report = threads.report()
    assert report["max_threads"] == 2 and report["threads_at_end"] == 1 and report["adaptive"] is True


def test_model_num_threads_reaches_the_worker_and_zero_is_a_config_error(caplog):
    import logging

    from loopserve.core.config import compose_config
    from loopserve.core.engine import Engine

    caplog.set_level(logging.INFO, logger="loopserve.threads")
    with pytest.raises(ValueError, match="model.num_threads must be >= 1"):
        compose_config(["model.num_threads=0"])
    with Engine(overrides=["model.num_threads=1", "loop=normal"]) as engine:
        assert engine.worker.cpu_threads.report()["source"] == "model.num_threads"
        assert engine.worker.cpu_threads.choice.max_threads == 1
    # The choice is logged at start-up.
    assert any(r.getMessage().startswith("CPU threads: 1 (model.num_threads)") for r in caplog.records)
