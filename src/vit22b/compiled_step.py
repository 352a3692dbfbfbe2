"""XLA's own memory accounting of the real train step, without allocating anything.

The trainer's sharded step (`train_state.state_shardings` + `make_train_step`, state donated, batch
sharded over data; with a teacher, the distillation objective and the teacher's params as a frozen
sharded input) is lowered with `jax.ShapeDtypeStruct` inputs and compiled, so even the full 22B/14
preset "fits" on a laptop's simulated devices. `vit22b plan`'s memory model is checked against it
(tests/test_plan.py, bench/plan_validate.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vit22b.config import ModelConfig
from vit22b.model import abstract_model, split_params
from vit22b.objectives import abstract_teacher, distill_objective
from vit22b.sharding import batch_sharding
from vit22b.train import TrainConfig, make_train_step
from vit22b.train_state import state_shardings


def step_memory(cfg: TrainConfig, mesh: Mesh, teacher: ModelConfig | None = None) -> dict[str, int]:
    """Per-device bytes of cfg's compiled train step on `mesh`: arguments (params, optimizer state,
    batch[, teacher]), temporaries, and the peak (outputs alias the donated state)."""
    graphdef, tx, shardings = state_shardings(cfg, mesh)
    _, params = split_params(abstract_model(cfg.model))

    def spec(leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"]),
             "params": jax.tree.map(spec, params, shardings["params"]),
             "opt_state": jax.tree.map(spec, jax.eval_shape(tx.init, params), shardings["opt_state"])}
    b, size, channels = cfg.batch_size, cfg.model.image_size, cfg.model.in_channels
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32,
                                           sharding=batch_sharding(mesh, 4)),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding(mesh, 1))}
    with jax.set_mesh(mesh):
        if teacher is None:
            lowered = make_train_step(graphdef, tx, cfg, shardings, mesh).jitted.lower(state, batch)
        else:
            frozen = abstract_teacher(teacher, mesh)
            step = make_train_step(graphdef, tx, cfg, shardings, mesh,
                                   loss_fn=distill_objective(graphdef, frozen.graphdef, teacher.image_size),
                                   frozen_shardings=frozen.shardings)
            lowered = step.jitted.lower(state, batch, frozen.params)
        ma = lowered.compile().memory_analysis()
    return {"arguments": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
            "peak": ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
            - ma.alias_size_in_bytes}
