"""Train-state checkpoints with orbax: every N steps and at the end, keep the last K, resume.

orbax writes each step into a temporary directory (`N.orbax-checkpoint-tmp*`) and renames it when
complete, so a crash or SIGKILL mid-save leaves the previous checkpoints intact; the leftover
temporary directory is ignored by orbax and removed at the next start. Checkpoints are restored
onto whatever sharding the abstract target carries, so a state saved on one mesh restores on
another.

Resuming (`restore_latest`) tries the newest checkpoint first and falls back to older ones: a
checkpoint that fails to restore (truncated or deleted files, a missing `_METADATA`, ...) is moved
aside to `checkpoints/damaged/<step>-<time>` (never deleted) with one warning line. Only when none
restores is it an error, naming each and its cause. A checkpoint whose recorded shapes belong to
another config is not damage: that is refused as such and nothing is moved.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

DAMAGED_DIR = "damaged"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    pass


def _cause(e: BaseException) -> str:
    """The innermost cause's first line, short: orbax wraps TensorStore errors whose own first
    line ("Encountered error while reading array index") says nothing about the file."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:160]}"


def _leaf_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of every array leaf: what a config determines, independent of how
    orbax spells the tree's containers."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sorted((tuple(x.shape), str(x.dtype)) for x in leaves if hasattr(x, "shape"))


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 lead: bool = True):
        self.directory = Path(directory).absolute()
        self.lead = lead  # the process that cleans up and moves damaged checkpoints aside
        self.keep, self.async_save = keep, async_save
        if lead and self.directory.exists():
            for tmp in self.directory.glob(f"*{_TMP_MARKER}*"):  # a save killed midway
                shutil.rmtree(tmp, ignore_errors=True)
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                               enable_async_checkpointing=self.async_save)
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restore `step` onto the shapes, dtypes and shardings of `abstract_state`; CheckpointError
        if its recorded shapes belong to another config, the library's error if it is damaged."""
        path = self.directory / str(step) / "default"
        try:
            recorded = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
        except Exception:  # unreadable metadata is damage: the restore below reports it
            recorded = None
        if recorded is not None and _leaf_signature(recorded) != _leaf_signature(abstract_state):
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} holds arrays of other shapes than this "
                "model/optimizer: it was written by a run with another config; use a fresh "
                "--workdir, or the original flags.")
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when there is none;
        newer damaged ones are moved aside (see the module docstring)."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as e:  # orbax/TensorStore raise bare Exception, ValueError, OSError...
                failed.append((step, _cause(e)))
                continue
            if failed:
                self._move_aside(failed, step)
            return step, state
        if failed:
            listed = "; ".join(f"{self.directory / str(s)} ({why})" for s, why in failed)
            raise CheckpointError(
                f"no checkpoint restores: {listed}. Move them out of {self.directory} to start "
                "over, or use a fresh --workdir")
        return None

    def _move_aside(self, failed: list[tuple[int, str]], good: int) -> None:
        if jax.process_count() > 1:  # everyone has failed on them before process 0 moves them
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vit22b checkpoint fallback")
        if self.lead:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, why in failed:
                dest = self.directory / DAMAGED_DIR / f"{step}-{stamp}"
                dest.parent.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(dest)
                print(f"warning: checkpoint {self.directory / str(step)} is damaged ({why}); moved "
                      f"to {dest}, resuming from step {good}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vit22b checkpoint fallback done")
        self.manager.close()  # forget the moved steps
        self.manager = self._manager()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of the (possibly abstract) arrays in `tree`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
