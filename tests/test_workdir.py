"""Work dirs and checkpoints under faults, without training: the lock, refusals that write nothing,
checkpoint fallback over damaged files, leftovers of a killed save, file modes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit22b.checkpoint import Checkpointer, CheckpointError, abstract_like
from vit22b.config import preset
from vit22b.model import abstract_model, split_params
from vit22b.weights import atomic_write, save_model
from vit22b.workdir import LOCK_FILE, WorkdirError, WorkdirLock, check_resumable

# --- the lock ----------------------------------------------------------------------------------


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(WorkdirError) as info:
            WorkdirLock(tmp_path).acquire()  # a second open file: flock refuses it
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "\n" not in message
    WorkdirLock(tmp_path).acquire()  # released on exit: free again


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    # Another process holds the lock as WorkdirLock does (flock + JSON), then dies by SIGKILL: its
    # flock goes with it, its JSON stays behind. (Plain Python: importing vit22b costs seconds.)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode()); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=f"pid {holder.pid} on host"):
        WorkdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # stale JSON left
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path, monkeypatch):
    import errno

    import vit22b.workdir as wd

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    WorkdirLock(tmp_path).acquire()  # taken over
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()}))
    with pytest.raises(WorkdirError, match=f"pid 1 on host elsewhere.*delete {tmp_path / LOCK_FILE}"):
        WorkdirLock(tmp_path).acquire()


# --- refusals before anything is written ------------------------------------------------------


def test_refused_resume_writes_nothing(tmp_path):
    cfg = preset("mu/4", image_size=8, in_channels=1, num_classes=10)
    (tmp_path / "config.json").write_text(cfg.to_json())
    (tmp_path / "train_config.json").write_text(json.dumps({"optim": {"optimizer": "adafactor",
                                                                      "momentum_dtype": "bfloat16"}}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(WorkdirError, match=r"another optimizer .*'optimizer': \('adafactor', 'adamw'\)"
                                           r".*--optimizer adafactor to resume"):
        check_resumable(tmp_path, cfg, {"optimizer": "adamw", "momentum_dtype": "bfloat16"})
    with pytest.raises(WorkdirError, match=r"another model config .*'depth': \(1, 2\)"):
        check_resumable(tmp_path, cfg.replace(depth=2), {"optimizer": "adafactor"})
    check_resumable(tmp_path, cfg, {"optimizer": "adafactor", "momentum_dtype": "bfloat16"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_execution_settings_may_change_on_resume(tmp_path):
    """remat, scan, dtypes and collective matmul leave every parameter as it was: a resume with
    other values is allowed; an architecture field beside them is still refused, by name."""
    cfg = preset("mu/4", image_size=8, in_channels=1, num_classes=10)
    (tmp_path / "config.json").write_text(cfg.to_json())
    run_it_otherwise = cfg.replace(remat="dots_saveable", scan=False, collective_matmul=True,
                                   dtype_mm="float32", dtype_act="bfloat16", attention="blockwise")
    check_resumable(tmp_path, run_it_otherwise, {"optimizer": "adafactor"})
    with pytest.raises(WorkdirError, match=r"another model config \(was -> now: \{'qk_norm'"):
        check_resumable(tmp_path, run_it_otherwise.replace(qk_norm=False), {"optimizer": "adafactor"})


# --- checkpoint fallback ---------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"step": jnp.int32(step), "params": {"a": jnp.arange(1000.0) + step, "b": jnp.ones((4, 4)) * step}}


@pytest.fixture
def three_checkpoints(tmp_path) -> Path:
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=3)
    for s in (1, 2, 3):
        ckpt.save(s, _state(s))
    ckpt.close()
    return directory


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated array file": lambda d: os.truncate(_largest(d), _largest(d).stat().st_size // 2),
    "deleted array file": lambda d: _largest(d).unlink(),
    "deleted array data": lambda d: shutil.rmtree(d / "default" / "d"),
    "garbled _METADATA": lambda d: (d / "default" / "_METADATA").write_text("{not json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_falls_back_to_the_previous(three_checkpoints, damage, capsys):
    DAMAGE[damage](three_checkpoints / "3")
    ckpt = Checkpointer(three_checkpoints)
    step, state = ckpt.restore_latest(abstract_like(_state(0)))
    assert step == 2 and int(state["step"]) == 2
    np.testing.assert_array_equal(state["params"]["a"], np.arange(1000.0) + 2)
    warning, = capsys.readouterr().err.splitlines()
    moved, = (three_checkpoints / "damaged").iterdir()
    assert moved.name.startswith("3-") and warning.startswith(
        f"warning: checkpoint {three_checkpoints / '3'} is damaged (") and f"moved to {moved}" in warning
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["1", "2", "damaged"]
    ckpt.save(3, _state(3))  # the step can be saved again, and restored
    ckpt.close()
    assert Checkpointer(three_checkpoints).restore_latest(abstract_like(_state(0)))[0] == 3


def test_no_checkpoint_restores_is_one_line_naming_each(three_checkpoints):
    for s in (1, 2, 3):
        DAMAGE["truncated array file"](three_checkpoints / str(s))
    with pytest.raises(CheckpointError) as info:
        Checkpointer(three_checkpoints).restore_latest(abstract_like(_state(0)))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no checkpoint restores: ")
    assert all(f"{three_checkpoints / str(s)} (" in message for s in (1, 2, 3))
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["1", "2", "3"]  # nothing moved


def test_checkpoint_of_another_config_is_not_damage(three_checkpoints):
    other = {"step": jnp.int32(0), "params": {"a": jnp.zeros(999), "b": jnp.ones((4, 4))}}
    with pytest.raises(CheckpointError, match="arrays of other shapes.*another config"):
        Checkpointer(three_checkpoints).restore_latest(abstract_like(other))
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["1", "2", "3"]


def test_leftover_of_a_killed_save_is_removed(three_checkpoints):
    shutil.copytree(three_checkpoints / "3", three_checkpoints / "4.orbax-checkpoint-tmp-1764600000")
    (three_checkpoints / "5.orbax-checkpoint-tmp-1764600001").mkdir()
    ckpt = Checkpointer(three_checkpoints)
    assert ckpt.restore_latest(abstract_like(_state(0)))[0] == 3
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["1", "2", "3"]
    ckpt.save(4, _state(4))
    ckpt.close()


# --- file modes follow the umask ---------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        cfg = preset("mu/4", image_size=8, in_channels=1, num_classes=10)
        _, abstract = split_params(abstract_model(cfg))
        save_model(tmp_path, jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract), cfg)
        atomic_write(tmp_path / "x.txt", lambda tmp: Path(tmp).write_text("x"))
        plain = tmp_path / "plain.txt"
        plain.write_text("y")
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("model.safetensors", "config.json", "x.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


# --- stop signals --------------------------------------------------------------------------------


def test_first_stop_signal_is_recorded_and_a_second_one_would_kill():
    import signal

    from vit22b.interrupt import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes
        assert stop.requested == signal.SIGTERM
        # the next SIGINT or SIGTERM takes the OS default: the process ends at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before
