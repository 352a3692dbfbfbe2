"""bench/common.py: the load rule that marks a timing run invalid, and round-robin timing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def test_load_above_the_core_count_invalidates_a_run(monkeypatch, capsys):
    cores = os.cpu_count() or 1
    assert common.load_valid((cores - 0.1, 0, 0), (cores, 0, 0))
    assert not common.load_valid((cores + 0.1, 0, 0), (1.0, 0, 0))
    ok = {"load_before": 1.0, "load_after": 1.0, "valid": True}
    bad = {"load_before": cores + 2.5, "load_after": 1.0, "valid": False}
    assert common.refuse_if_invalid([ok, ok], "out.json") is False
    assert capsys.readouterr().out == ""
    assert common.refuse_if_invalid([ok, bad], "out.json") is True
    said = capsys.readouterr().out
    assert f"INVALID RUN: the load average reached {cores + 2.5:.1f} on {cores} cores" in said
    assert "out.json" in said


def test_time_interleaved_rotates_and_records_each_runners_load(monkeypatch):
    cores = os.cpu_count() or 1
    calls: list[str] = []
    # (before, after) per call in the order a, b, b, a, a, b: b's second call ends overloaded
    quiet, busy = (0.5,), (cores + 1.0,)
    loads_seen = iter([quiet, quiet, quiet, quiet, quiet, busy, quiet, quiet, quiet, quiet, quiet, quiet])
    monkeypatch.setattr(common, "loadavg", lambda: next(loads_seen))
    monkeypatch.setattr(common, "cpu_busy_s", lambda: None)  # no /proc/stat: the load alone decides
    loads: dict = {}
    times = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    steps=3, pause_s=0, loads=loads)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the starting runner rotates
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert loads["a"] == {"load_before": 0.5, "load_after": 0.5, "foreign_cores": None, "valid": True}
    assert loads["b"]["load_after"] == cores + 1.0 and loads["b"]["valid"] is False


def test_a_high_load_of_our_own_threads_is_valid_but_other_processes_are_not(monkeypatch):
    """The load average counts the benchmark's own threads; what invalidates a run above the core
    count is CPU time that other processes took during the contender's calls."""
    cores = os.cpu_count() or 1
    monkeypatch.setattr(common, "loadavg", lambda: (cores + 0.2,))
    monkeypatch.setattr(common.time, "process_time", lambda: 0.0)  # this process: no CPU time
    for others_per_call, valid in ((0.0, True), (1.0, False)):
        busy = iter(range(100))
        monkeypatch.setattr(common, "cpu_busy_s", lambda o=others_per_call, b=busy: o * next(b))
        loads: dict = {}
        common.time_interleaved({"a": lambda: common.time.sleep(0.02)}, steps=2, pause_s=0, loads=loads)
        assert loads["a"]["valid"] is valid
        if others_per_call:  # 1 CPU-second per ~0.02 s call: far above FOREIGN_CORES_MAX
            assert loads["a"]["foreign_cores"] > 10 * common.FOREIGN_CORES_MAX
        else:
            assert loads["a"]["foreign_cores"] == 0.0
