"""Train-state checkpoints with orbax: every N steps and at the end, keep the last K, resume.

orbax writes each step into a temporary directory and renames it when complete, so a crash or
SIGKILL mid-save leaves the previous checkpoints intact; a run restarted in the same work dir
restores the latest complete one. Checkpoints are restored onto whatever sharding the abstract
target carries, so a state saved on one mesh restores on another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restore `step` onto the shapes, dtypes and shardings of `abstract_state`."""
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this model/optimizer "
                f"({type(e).__name__}: {str(e)[:300]}). It was written by a run with another "
                "config: use a fresh --workdir, or the original flags.") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of the (possibly abstract) arrays in `tree`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
