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
    loads: dict = {}
    times = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    steps=3, pause_s=0, loads=loads)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the starting runner rotates
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert loads["a"] == {"load_before": 0.5, "load_after": 0.5, "valid": True}
    assert loads["b"]["load_after"] == cores + 1.0 and loads["b"]["valid"] is False
