"""The 2-D mesh: rules, config-time checks, equivalence with one device, checkpoint resharding.

Runs on 8 simulated CPU devices (conftest.py sets XLA_FLAGS before JAX starts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vit22b.checkpoint import Checkpointer, abstract_like
from vit22b.config import ConfigError, ModelConfig
from vit22b.model import abstract_model, apply, init_model, logical_axes, split_params
from vit22b.objectives import classification_loss
from vit22b.optim import OptimConfig
from vit22b.sharding import RULES, ShardingRules, check_divisibility, make_mesh, param_spec, parse_mesh
from vit22b.train import TrainConfig, make_train_step, to_global
from vit22b.train_state import init_state
from vit22b.weights import flatten

# 8 heads and width/MLP divisible by 8, so every mesh below can shard the model axis.
CFG = ModelConfig(width=64, depth=2, mlp_dim=128, num_heads=8, patch_size=2, image_size=8,
                  in_channels=1, num_classes=10, dtype_mm="float32")
MESHES = ["8x1", "4x2", "2x4", "1x8"]


def batch(n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
            "label": (np.arange(n) % 10).astype(np.int32)}


def test_parse_mesh():
    assert parse_mesh("4x2", 8) == (4, 2)
    assert parse_mesh("-1x2", 8) == (4, 2)
    assert parse_mesh("8", 8) == (8, 1)
    assert parse_mesh("2x-1", 8) == (2, 4)
    for bad, fragment in [("3x2", "6 devices but 8"), ("ax2", "DATAxMODEL"), ("-1x-1", "at most one"),
                          ("-1x3", "do not divide")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_mesh(bad, 8)


def test_mesh_1x1_is_the_first_device_alone():
    mesh = make_mesh("1x1")
    assert mesh.devices.tolist() == [[jax.devices()[0]]] and len(jax.devices()) == 8


def test_mesh_axes_are_auto_on_purpose():
    mesh = make_mesh("4x2")
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_divisibility_errors_name_the_size_and_fix():
    mesh = make_mesh("2x4")
    with pytest.raises(ConfigError, match="num_heads 6 is not divisible by the model axis"):
        check_divisibility(CFG.replace(num_heads=6, width=48, mlp_dim=96), 16, mesh)
    with pytest.raises(ConfigError, match="global batch 15 is not divisible by the data axis"):
        check_divisibility(CFG, 15, mesh)
    check_divisibility(CFG, 16, mesh)


def test_param_specs_follow_the_rules():
    """Golden PartitionSpecs: the paper's layout (heads/MLP over model; big kernels over data)."""
    mesh = make_mesh("4x2")
    abstract = abstract_model(CFG)
    axes = flatten(logical_axes(abstract))
    shapes = flatten(split_params(abstract)[1])

    def spec(name: str, rules: ShardingRules) -> P:
        return param_spec(axes[name], shapes[name].shape, jnp.float32, mesh, rules)

    no_fsdp = ShardingRules(fsdp_axis=None)
    assert spec("encoder/in_kernel", no_fsdp) == P(None, None, "model", None)
    assert spec("encoder/out_kernel", no_fsdp) == P(None, "model", None, None)
    assert spec("encoder/norm_scale", no_fsdp) == P(None, None)
    assert spec("map_head/mlp_in_kernel", no_fsdp) == P(None, "model")
    fsdp_all = ShardingRules(fsdp_min_bytes=0)
    assert spec("encoder/in_kernel", fsdp_all) == P(None, "data", "model", None)
    assert spec("encoder/out_kernel", fsdp_all) == P(None, "model", None, "data")
    assert spec("head_kernel", fsdp_all) == P("data", None)
    # The default threshold (4 MiB) keeps this tiny model's parameters off the data axis.
    assert all("data" not in spec(n, RULES) for n in axes)


def test_state_is_created_sharded_as_the_rules_say():
    mesh = make_mesh("2x4")
    cfg = TrainConfig(model=CFG, optim=OptimConfig(warmup_steps=1), steps=2, batch_size=16)
    _, _, state, shardings = init_state(cfg, mesh)
    abstract = abstract_model(CFG)
    axes = flatten(logical_axes(abstract))
    for name, array in flatten(state["params"]).items():
        want = param_spec(axes[name], array.shape, array.dtype, mesh)
        assert array.sharding.spec == want, name
        assert array.sharding.mesh.shape == mesh.shape
    moments = state["opt_state"][2].ema["encoder"]["in_kernel"]  # EMA shares the kernel's layout
    assert moments.sharding.spec == P(None, None, "model", None)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    # the values are the eager model's (op by op, so up to an ulp of fusion): the initialiser
    # compiles at LLVM -O1 on CPU, which must not change what it computes
    _, eager = split_params(init_model(CFG, seed=cfg.seed))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12),
                 jax.device_get(state["params"]), jax.device_get(eager))


def _loss_and_grads(mesh_spec: str | None, cfg: ModelConfig) -> tuple[float, dict]:
    graphdef, params = split_params(init_model(cfg, seed=1))
    b = batch()

    def loss_fn(p, images, labels):
        return classification_loss(apply(graphdef, p, images)[0], labels, "sigmoid")

    if mesh_spec is None:
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, b["image"], b["label"])
        return float(loss), jax.device_get(grads)
    mesh = make_mesh(mesh_spec)
    tcfg = TrainConfig(model=cfg, optim=OptimConfig(warmup_steps=1), steps=2, batch_size=16)
    _, _, state, shardings = init_state(tcfg, mesh)
    params = jax.device_put(params, shardings["params"])
    with jax.set_mesh(mesh):
        data = jax.device_put(b, jax.sharding.NamedSharding(mesh, P("data")))
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, data["image"], data["label"])
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(None, CFG)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_loss_and_gradients_match_one_device(mesh_spec, reference):
    loss, grads = _loss_and_grads(mesh_spec, CFG)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                            jax.tree.leaves(reference[1]), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_spec", ["4x2", "2x4"])
def test_collective_matmul_model_matches_one_device(mesh_spec, reference):
    loss, grads = _loss_and_grads(mesh_spec, CFG.replace(collective_matmul=True))
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-6)


def test_collective_matmul_replaces_xla_collectives_in_the_step():
    mesh = make_mesh("2x4")
    cfg = TrainConfig(model=CFG.replace(collective_matmul=True, remat="none"),
                      optim=OptimConfig(warmup_steps=1), steps=2, batch_size=16)
    graphdef, tx, state, shardings = init_state(cfg, mesh)
    step = make_train_step(graphdef, tx, cfg, shardings, mesh)
    with jax.set_mesh(mesh):
        hlo = step.jitted.lower(state, to_global(batch(), mesh)).compile().as_text()
    assert hlo.count("collective-permute") >= 2 * 3  # (k-1) per projection, forward and backward


def test_checkpoint_reshards_across_meshes(tmp_path):
    cfg = TrainConfig(model=CFG, optim=OptimConfig(warmup_steps=1), steps=2, batch_size=16)
    _, _, state, _ = init_state(cfg, make_mesh("4x2"))
    saved = jax.device_get(state)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    for spec, devices in [("2x4", None), ("1x1", jax.devices()[:1])]:
        mesh = make_mesh(spec, devices)
        _, _, target, _ = init_state(dataclasses.replace(cfg, seed=5), mesh)  # other values
        restored = ckpt.restore(1, abstract_like(target))
        for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                           jax.tree.leaves(target), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
            assert a.sharding == t.sharding
    ckpt.close()


def test_optimizer_state_leaves_all_have_shardings():
    mesh = make_mesh("4x2")
    cfg = TrainConfig(model=CFG, optim=OptimConfig(warmup_steps=1), steps=2, batch_size=16)
    _, tx, state, shardings = init_state(cfg, mesh)
    assert isinstance(tx, optax.GradientTransformation)
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == sh
