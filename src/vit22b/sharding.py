"""The 2-D device mesh (data x model) and the one rule table that maps logical axes onto it.

Every parameter carries logical axis names (model.logical_axes); activations are constrained with
`constrain(x, names)`. `RULES` maps a logical name to a mesh axis, with the paper's layout:

    batch       -> data    data parallelism
    heads, mlp  -> model   each of the k model devices computes 1/k of every fused projection's
                           output (its heads and its share of the MLP; see encoder.py's layout);
                           the sequential block's qkv / attn-out / MLP kernels carry the same
                           names, so they split the same way (Megatron-style)
    act_embed   -> model   between blocks each model device holds 1/k of the activations' features
    embed       -> data    only for kernels of at least `fsdp_min_bytes`: large parameters are also
                           sharded over the data axis (ZeRO-3/FSDP style); XLA all-gathers them
                           before use and reduce-scatters their gradients

The mesh uses Auto axis types on purpose: XLA's sharding propagation (GSPMD) inserts the
collectives from these annotations, which keeps the model code free of per-op shardings. (This
JAX's `jax.make_mesh` defaults to Explicit axes, where every contraction over a sharded dim would
need an explicit out_sharding.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vit22b.config import ConfigError, ModelConfig

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: tuple[tuple[str, str | None], ...] = (
        ("batch", DATA), ("heads", MODEL), ("mlp", MODEL), ("act_embed", MODEL),
        ("act_heads", MODEL), ("act_mlp", MODEL),
    )
    fsdp_axis: str | None = DATA  # None disables parameter sharding over data
    fsdp_min_bytes: int = 4 * 2**20  # big_vision's threshold: small tensors stay replicated
    fsdp_logical: str = "embed"

    def mesh_axis(self, logical: str | None) -> str | None:
        return dict(self.rules).get(logical) if logical else None


RULES = ShardingRules()


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
    """'4x2' -> (4, 2); one entry may be -1 (fills); '8' means 8x1. Product must be num_devices."""
    try:
        parts = [int(p) for p in spec.lower().split("x")]
    except ValueError:
        raise ConfigError(f"--mesh {spec!r}: write DATAxMODEL, e.g. 4x2 or -1x2") from None
    if len(parts) == 1:
        parts.append(1)
    if len(parts) != 2 or parts.count(-1) > 1 or any(p == 0 or p < -1 for p in parts):
        raise ConfigError(f"--mesh {spec!r}: write DATAxMODEL with positive sizes and at most one -1")
    if -1 in parts:
        known = math.prod(p for p in parts if p != -1)
        if num_devices % known:
            raise ConfigError(f"--mesh {spec!r}: {num_devices} devices do not divide by {known}")
        parts[parts.index(-1)] = num_devices // known
    if math.prod(parts) != num_devices:
        raise ConfigError(f"--mesh {spec!r} has {math.prod(parts)} devices but {num_devices} are "
                          f"available: the mesh must use every device (e.g. {num_devices}x1)")
    return parts[0], parts[1]


def make_mesh(spec: str = "-1x1", devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over all devices of all processes (or the given ones); "1x1": the
    first device alone."""
    devices = list(devices) if devices is not None else jax.devices()
    if spec == "1x1" and len(devices) > 1:
        # One device of several (a debug run, or a small model on a big host). Every process must
        # own a device of the mesh, so a multi-process run has to use them all.
        if jax.process_count() > 1:
            raise ConfigError(f"--mesh 1x1 leaves the devices of {jax.process_count() - 1} processes "
                              f"out: use every device (e.g. --mesh -1x1)")
        devices = devices[:1]
    shape = parse_mesh(spec, len(devices))
    return jax.make_mesh(shape, (DATA, MODEL), axis_types=(AxisType.Auto,) * 2, devices=devices)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return mesh.shape[axis] if axis else 1


def param_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], dtype: Any, mesh: Mesh,
               rules: ShardingRules = RULES) -> PartitionSpec:
    spec: list[str | None] = []
    for dim, name in enumerate(axes):  # a dim that does not divide, or whose axis is taken, stays whole
        axis = rules.mesh_axis(name)
        spec.append(axis if axis and axis not in spec and shape[dim] % mesh.shape[axis] == 0 else None)
    big = np.prod(shape) * np.dtype(dtype).itemsize >= rules.fsdp_min_bytes
    if rules.fsdp_axis and big and _axis_size(mesh, rules.fsdp_axis) > 1 and rules.fsdp_axis not in spec:
        candidates = [d for d, a in enumerate(axes) if a == rules.fsdp_logical and spec[d] is None]
        candidates += sorted((d for d in range(len(shape)) if spec[d] is None and axes[d] != "layers"),
                             key=lambda d: -shape[d])
        for d in candidates:
            if shape[d] % mesh.shape[rules.fsdp_axis] == 0:
                spec[d] = rules.fsdp_axis
                break
    return PartitionSpec(*spec)


def param_shardings(axes_tree: Any, abstract_params: Any, mesh: Mesh,
                    rules: ShardingRules = RULES) -> Any:
    """NamedSharding per parameter, from its logical axes, shape and size."""
    return jax.tree.map(
        lambda a, p: NamedSharding(mesh, param_spec(a, p.shape, p.dtype, mesh, rules)),
        axes_tree, abstract_params, is_leaf=lambda x: isinstance(x, tuple))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shards: Any, mesh: Mesh) -> Any:
    """Optimizer moments shaped like their parameter share its sharding; factored row/column
    statistics are sharded over data only if large; counters are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def match(leaf: Any, shard: NamedSharding) -> NamedSharding:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            return replicated
        fits = len(shape) == len(shard.spec) and all(
            a is None or shape[d] % mesh.shape[a] == 0 for d, a in enumerate(shard.spec))
        if fits:
            return shard
        # factored statistics have their own shapes: only the size rule (FSDP) applies to them
        return NamedSharding(mesh, param_spec((None,) * len(shape), shape, leaf.dtype, mesh))

    return optax.tree_utils.tree_map_params(
        tx, match, abstract_opt_state, param_shards,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def check_divisibility(cfg: ModelConfig, batch_size: int, mesh: Mesh, rules: ShardingRules = RULES
                       ) -> None:
    """Config-time errors for sizes the mesh can't split evenly (instead of an XLA error later)."""
    data, model = mesh.shape[DATA], mesh.shape[MODEL]
    problems = []
    if batch_size % data:
        problems.append(f"global batch {batch_size} is not divisible by the data axis ({data}): use "
                        f"a batch that is a multiple of {data}")
    if model > 1:
        for name, size in (("num_heads", cfg.num_heads), ("width", cfg.width), ("mlp_dim", cfg.mlp_dim)):
            if size % model:
                fit = math.gcd(size, model)
                problems.append(f"{name} {size} is not divisible by the model axis ({model}): choose "
                                f"a model axis that divides it (e.g. --mesh {data * model // fit}x{fit})"
                                " or another preset")
    if problems:
        raise ConfigError("the mesh does not fit: " + "; ".join(problems))


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], rules: ShardingRules = RULES
              ) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec: list[str | None] = []
    for dim, name in enumerate(logical_axes):
        axis = rules.mesh_axis(name)
        ok = axis in mesh.axis_names and axis not in spec and x.shape[dim] % mesh.shape[axis] == 0
        spec.append(axis if ok else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA, *([None] * (ndim - 1))))
