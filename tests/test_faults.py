"""Fault injection: `vit22b train` subprocesses killed (SIGKILL) during steps, a checkpoint save and an
evaluation, stopped with SIGINT and SIGTERM, and resumed over a damaged latest checkpoint, all in
one work dir (6 runs after the reference one), must end with the same weights, bit for bit, as
one uninterrupted run.

The kill points are drawn from a seeded generator (SEED) among the step lines the run prints
(`--no-progress --log-every 1`), so each lands while the process is inside the phase named, not
at a fixed wall-clock time that a slower machine would shift.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FAST_COMPILE

STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 40, 5, 4  # eval every 4: the default for 40 steps
SEED = 20261201
STEP_LINE = re.compile(r"^step (\d+)/\d+: loss")
SAVE_LINE = re.compile(r"^step (\d+)/\d+: checkpoint ->")


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "vit22b.cli", "train", "--preset", "mu/4", "--image-size", "8",
            "--steps", str(STEPS), "--batch-size", "32", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--warmup", "3", "--cooldown", "8", "--log-every", "1", "--no-progress", "--workdir",
            str(workdir)]


ENV = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "PYTHONUNBUFFERED": "1",
       # Compile once: later runs load the executables (the same programs: the same bits), which
       # cuts each run from ~60 s to ~20 s on a loaded 2-core machine.
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(workdir: Path, when: Callable[[str], bool] | None = None, sig: int = signal.SIGKILL
         ) -> tuple[int, list[str], str]:
    """Run the command; send `sig` at the first stdout line where `when` holds. (rc, lines, stderr)"""
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache")}
    # stderr goes to a file, not a pipe: a pipe nobody reads while stdout is being followed fills
    # at 64 KiB and blocks the child in write() for ever (it did, in CI).
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(_cmd(workdir), env=env, stdout=subprocess.PIPE, stderr=err_file,
                                text=True)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if when is not None and when(lines[-1]):
                proc.send_signal(sig)
                break
        out, _ = proc.communicate(timeout=600)
        err_file.seek(0)
        err = err_file.read()
    lines += out.splitlines()
    return proc.returncode, lines, err


def _resumed_step(lines: list[str]) -> int:
    found = [int(m.group(1)) for line in lines if (m := re.search(r"resumed from .*/(\d+)$", line))]
    return found[0] if found else 0


def _step_of(pattern: re.Pattern[str], line: str) -> int | None:
    m = pattern.match(line)
    return int(m.group(1)) if m else None


def _weights(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "model.safetensors"))


def _assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray], context: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} ({context})")


@pytest.mark.slow
def test_kills_signals_and_damage_resume_bit_identical(tmp_path):
    rng = np.random.default_rng(SEED)
    rc, _, err = _run(tmp_path / "straight")
    assert rc == 0, err
    reference = _weights(tmp_path / "straight")

    work = tmp_path / "faulty"
    # 1. SIGKILL during steps: at a random step line.
    k1 = int(rng.integers(3, 9))
    rc, lines, _ = _run(work, lambda line: _step_of(STEP_LINE, line) == k1)
    assert rc == -signal.SIGKILL, f"kill at step {k1}: the run ended first ({rc})"

    # 2. SIGKILL during a save: right after a checkpoint save has been issued (orbax writes it in
    # the background, so the process dies with the save half done).
    rc, lines, _ = _run(work, lambda line: _step_of(SAVE_LINE, line) is not None)
    assert rc == -signal.SIGKILL

    # 3. SIGKILL during an evaluation: the step line of an evaluation step comes just before it.
    rc, lines, _ = _run(work, lambda line: (s := _step_of(STEP_LINE, line)) is not None
                        and s % EVAL_EVERY == 0)
    assert rc == -signal.SIGKILL

    # 4-5. SIGINT and SIGTERM at a random step: the steps done by then are saved, exit 128 + signal.
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        seen: list[int] = []

        def at(line: str, ahead: int = int(rng.integers(1, 4)), seen: list[int] = seen) -> bool:
            s = _step_of(STEP_LINE, line)
            if s is not None:
                seen.append(s)
            return len(seen) == ahead

        rc, lines, err = _run(work, at, sig)
        name = signal.Signals(sig).name
        stopped = [line for line in lines if line.startswith(f"stopped by {name}")]
        assert rc == code and len(stopped) == 1, (rc, lines[-3:], err[-500:])
        saved = int(re.search(r"after step (\d+)", stopped[0]).group(1))
        assert saved >= seen[-1], f"{name}: step {seen[-1]} was done but only {saved} saved"
        assert (work / "checkpoints" / str(saved)).is_dir()
        assert "Traceback" not in err

    # 6. The latest checkpoint (the SIGTERM one) damaged, its largest file truncated: the run falls
    # back to the one before, says so in one line, moves the damaged one aside, runs to the end
    # and ends bit-identical to the uninterrupted run.
    damaged = work / "checkpoints" / str(saved)
    largest = max((p for p in damaged.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with largest.open("r+b") as f:
        f.truncate(largest.stat().st_size // 2)
    previous = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()
                   and int(p.name) < saved)
    rc, lines, err = _run(work)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and f"/{saved} is damaged" in warnings[0], err[-2000:]
    assert _resumed_step(lines) == previous
    assert [p.name.split("-")[0] for p in (work / "checkpoints" / "damaged").iterdir()] == [str(saved)]
    _assert_same_weights(reference, _weights(work), "after kills, signals and a damaged checkpoint")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_decoding_workers(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, the grain decoding workers too: they
    ignore it, so the trainer still finishes its step, saves and exits 130 (not a broken stream)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    cmd = [sys.executable, "-m", "vit22b.cli", "train", "--data", str(tmp_path / "images"), "--preset",
           "mu/4", "--image-size", "8", "--steps", "1000", "--batch-size", "8", "--log-every", "1",
           "--no-progress", "--data-workers", "1", "--workdir", str(tmp_path / "w")]
    with tempfile.TemporaryFile("w+") as err_file:  # a file, not a pipe: see _run
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if _step_of(STEP_LINE, line) == 5:
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, _ = proc.communicate(timeout=300)
        err_file.seek(0)
        err = err_file.read()
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGINT after step")]
    assert proc.returncode == 130 and len(stopped) == 1, (proc.returncode, out[-500:], err[-2000:])
    saved = int(re.search(r"after step (\d+)", stopped[0]).group(1))
    assert saved >= 5 and (tmp_path / "w" / "checkpoints" / str(saved)).is_dir()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]  # workers quiet too
