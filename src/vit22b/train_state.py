"""The train state (step, parameters, optimizer state), created directly in its shards.

    graphdef, tx, state, shardings = init_state(train_config, mesh)

Nothing is ever built whole on one device: `state_shardings` derives every leaf's NamedSharding
from shapes alone (sharding.py's rules), and the initialiser is jitted with those as its output
shardings, so each device computes only its own slices. `initial_params` does the same for
weights read from a file (`--init`). remat="auto" is resolved here, once, by the planner.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit22b.config import ModelConfig
from vit22b.model import abstract_model, init_model, logical_axes, split_params
from vit22b.objectives import teacher_config
from vit22b.optim import make_optimizer
from vit22b.sharding import DATA, MODEL, make_mesh, opt_state_shardings, param_shardings

if TYPE_CHECKING:
    from vit22b.train import TrainConfig

State = dict[str, Any]


def state_shardings(cfg: TrainConfig, mesh: Mesh) -> tuple[Any, optax.GradientTransformation, Any]:
    """(graphdef, optimizer, NamedSharding per state leaf), from shapes alone: nothing allocated."""
    abstract = abstract_model(cfg.model)
    graphdef, abstract_params = split_params(abstract)
    params = param_shardings(logical_axes(abstract), abstract_params, mesh)
    tx = make_optimizer(cfg.optim, abstract_params, cfg.steps)
    opt_state = opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_params), params, mesh)
    return graphdef, tx, {"step": NamedSharding(mesh, PartitionSpec()), "params": params,
                          "opt_state": opt_state}


def planned_remat(cfg: TrainConfig, mesh: Mesh) -> TrainConfig:
    """remat="auto" resolved by the planner for this batch, mesh, platform and device memory
    (plan.auto_remat); any other policy is kept."""
    if cfg.model.remat != "auto":
        return cfg
    from vit22b.plan import auto_remat, device_memory_bytes

    teacher = teacher_config(cfg.teacher, cfg.model, cfg.teacher_dtype) if cfg.teacher else None
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())  # local
    remat, _ = auto_remat(cfg.model, cfg.batch_size, mesh.shape[DATA], mesh.shape[MODEL],
                          device_memory_bytes(device), cfg.optim.optimizer, cfg.grad_accum, teacher,
                          device.platform)
    return dataclasses.replace(cfg, model=cfg.model.replace(remat=remat))


def init_state(cfg: TrainConfig, mesh: Mesh | None = None, *, abstract: bool = False
               ) -> tuple[Any, optax.GradientTransformation, State, Any]:
    """The train state, created directly in its shards (no full copy on one device).
    `abstract=True`: ShapeDtypeStructs with those shardings (a restore target), nothing computed.
    The graphdef carries the model as it runs: remat="auto" resolved (`planned_remat`)."""
    mesh = mesh or make_mesh(cfg.mesh)
    cfg = planned_remat(cfg, mesh)
    graphdef, tx, shardings = state_shardings(cfg, mesh)

    def init() -> State:
        _, params = split_params(init_model(cfg.model, seed=cfg.seed))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    with jax.set_mesh(mesh):
        init_fn = jax.jit(init, out_shardings=shardings, compiler_options=init_compiler_options(mesh))
        if abstract:
            state = jax.eval_shape(init_fn)
        elif cfg.init_from:
            params = initial_params(cfg.init_from, cfg.model, shardings["params"])
            opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
            state = {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
                     "params": params, "opt_state": opt_state}
        else:
            state = init_fn()
    return graphdef, tx, state, shardings


def init_compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """XLA's CPU backend spends 9-18 s in LLVM -O3 on the initialiser's random-number code, for
    any model size; at -O1 it compiles about 4x faster and gives bit-identical parameters (measured:
    `bench/xla_cpu_flags.py`, row "init"). The initialiser runs once, so its own speed is moot."""
    return {"xla_backend_optimization_level": 1} if mesh.devices.flat[0].platform == "cpu" else None


HEAD = ("head_kernel", "head_bias")


def initial_params(location: str, model: ModelConfig, shardings: Any) -> Any:
    """The weights at `location` fitted to `model` (posemb resampled, channels adapted, a new zero
    head when the classes differ) and placed in their shards: each process builds only the slices
    its devices hold, from the full host copy every process reads."""
    from vit22b.weights import fit_weights, flatten, read_weights, unflatten

    flat, _ = read_weights(location)
    _, expected = split_params(abstract_model(model))
    want = flatten(expected)
    new_head = [k for k in HEAD if k in want and (k not in flat or flat[k].shape != want[k].shape)]
    flat = {k: v for k, v in flat.items() if k not in HEAD or k in want}  # a headless model drops it
    fitted = flatten(fit_weights(flat, expected, skip=tuple(new_head)))
    for k in new_head:  # as a fresh model: zero kernel, bias at head_bias_init (model.py)
        fill = model.head_bias_init if k == "head_bias" else 0.0
        fitted[k] = np.full(want[k].shape, fill, np.float32)
    if new_head:
        print(f"init from {location}: a new zero head for {model.num_classes} classes")
    shard = flatten(shardings)
    return unflatten({k: jax.make_array_from_callback(v.shape, shard[k], lambda idx, v=v: v[idx])
                      for k, v in fitted.items()})
