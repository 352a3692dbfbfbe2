"""A training work dir: checked before anything is written, then held by one run at a time.

`check_resumable` compares a run's config with what an existing work dir holds (read only), so a
refused run leaves every file as it was. `WorkdirLock` keeps a second run out of a work dir in use.

The lock is `W/train.lock`, held with `fcntl.flock` for the whole run. The kernel drops a flock
when its holder dies (even by SIGKILL), so a lock left behind by a dead process is simply taken
over; the file's JSON names the holder (pid, host, start time) for the refusal message. Where the
file system has no flock (some network mounts), the JSON alone decides: a holder on this host
whose pid is gone is taken over, one on another host must be removed by hand. Multi-host runs:
only process 0 takes the lock (the processes of one run share the work dir); its verdict is
broadcast so every process of a refused run stops.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from vit22b.config import EXECUTION_FIELDS, ModelConfig
from vit22b.weights import CONFIG_FILE

LOCK_FILE = "train.lock"
TRAIN_CONFIG_FILE = "train_config.json"
# Optimizer fields that shape the checkpointed optimizer state: a resume with other values cannot
# restore (the rest, e.g. lr or steps, may change between runs).
STATE_SHAPING_OPTIM_FIELDS = ("optimizer", "momentum_dtype")


class WorkdirError(RuntimeError):
    """The work dir cannot be used by this run: the message names the cause and the fix."""


def check_resumable(workdir: Path, model: ModelConfig, optim: dict[str, Any]) -> None:
    """Refuse (without writing) a work dir that holds a run of another model or optimizer."""
    config_path = workdir / CONFIG_FILE
    if config_path.exists():
        old = ModelConfig.from_json(config_path.read_text())
        # How the model runs (remat, scan, matmul dtype, collective matmul) may change between
        # runs: the parameters, and so the checkpoints, are the same.
        diff = {k: (getattr(old, k), getattr(model, k)) for k in dataclasses.asdict(old)
                if k not in EXECUTION_FIELDS and getattr(old, k) != getattr(model, k)}
        if diff:
            raise WorkdirError(
                f"work dir {workdir} holds a run of another model config (was -> now: {diff}); "
                "use a new --workdir, or the original flags to resume it.")
    train_path = workdir / TRAIN_CONFIG_FILE
    if train_path.exists():
        try:
            old_optim = json.loads(train_path.read_text()).get("optim", {})
        except (json.JSONDecodeError, AttributeError):
            return  # unreadable: the checkpoint restore decides
        diff = {k: (old_optim[k], optim[k]) for k in STATE_SHAPING_OPTIM_FIELDS
                if k in old_optim and old_optim[k] != optim.get(k)}
        if diff:
            flags = " ".join(f"--{k.replace('_', '-')} {v[0]}" for k, v in diff.items())
            raise WorkdirError(
                f"work dir {workdir} holds a run with another optimizer (was -> now: {diff}), whose "
                f"checkpoints cannot restore into this one: use a new --workdir, or {flags} to resume it.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """Held for one run: `acquire()` or raise WorkdirError naming the holder; `release()`."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _refuse(self, holder: dict[str, Any], note: str = "") -> WorkdirError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("started")
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        return WorkdirError(f"work dir {self.path.parent} is in use by another run ({who}{when}){note}: "
                            "wait for it to finish or stop it, or use another --workdir")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._holder()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            try:
                self._check_by_pid()  # no flock on this file system
            except WorkdirError:
                os.close(fd)
                raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd

    def _check_by_pid(self) -> None:
        holder = self._holder()
        if not holder or holder.get("pid") == os.getpid():
            return
        if holder.get("host") == socket.gethostname():
            if _pid_alive(int(holder.get("pid", -1))):
                raise self._refuse(holder)
            return  # stale: its process is gone
        raise self._refuse(holder, f" and this file system cannot tell whether it is alive; if it is "
                                   f"not, delete {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds it
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_workdir(workdir: Path) -> WorkdirLock | None:
    """Process 0 takes the lock; every process learns whether it got it (and raises if not)."""
    import jax

    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    error = ""
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirError as e:
            error = str(e)
    if jax.process_count() > 1:
        error = _broadcast_text(error)
    if error:
        raise WorkdirError(error)
    return lock


def _broadcast_text(text: str, size: int = 1024) -> str:
    """Process 0's `text` (up to `size` bytes) in every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    buf = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
