"""The optimiser recipe (optim.py): schedules, weight-decay masks, Adafactor state, clipping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit22b.optim import OptimConfig, learning_rate_schedule, make_optimizer
from vit22b.weights import flatten

PEAK = 2e-3


def lrs(cfg: OptimConfig, total: int, steps: np.ndarray) -> np.ndarray:
    return np.asarray(learning_rate_schedule(cfg, total)(jnp.asarray(steps)), np.float64)


# --- learning-rate schedules ----------------------------------------------------------------


def test_rsqrt_schedule_shape():
    warmup, cooldown, timescale, total = 10, 20, 10, 100
    cfg = OptimConfig(learning_rate=PEAK, schedule="rsqrt", warmup_steps=warmup,
                      cooldown_steps=cooldown, timescale=timescale)
    t = np.arange(total + 1)
    lr = lrs(cfg, total, t)

    # Linear warm-up that reaches the peak at the last warm-up step.
    np.testing.assert_allclose(lr[:warmup], PEAK * (t[:warmup] + 1) / warmup, rtol=1e-6)
    np.testing.assert_allclose(np.diff(lr[:warmup]), PEAK / warmup, rtol=1e-5)
    assert lr[warmup - 1] == pytest.approx(PEAK, rel=1e-6)
    # Reciprocal square root after warm-up, before the cool-down.
    mid = t[warmup:total - cooldown + 1]
    np.testing.assert_allclose(lr[mid], PEAK / np.sqrt(1 + (mid - warmup) / timescale), rtol=1e-6)
    assert lr[warmup] == pytest.approx(PEAK, rel=1e-6)
    # Linear cool-down: the rsqrt value times (total - t) / cooldown, 0 at the end.
    cool = t[total - cooldown:]
    rsqrt = PEAK / np.sqrt(1 + (cool - warmup) / timescale)
    np.testing.assert_allclose(lr[cool], rsqrt * (total - cool) / cooldown, rtol=1e-5, atol=1e-12)
    assert lr[total - 1] < 0.02 * PEAK  # the last trained step
    assert lr[total] == 0.0
    assert np.all(np.diff(lr[warmup:]) <= 0)  # non-increasing after the peak


def test_rsqrt_warmup_is_capped_by_a_short_run():
    cfg = OptimConfig(learning_rate=PEAK, warmup_steps=1000, cooldown_steps=0, timescale=10)
    lr = lrs(cfg, 5, np.arange(5))
    # warm-up shortened to total - 1 = 4 steps, so the peak is reached within the run
    np.testing.assert_allclose(lr, PEAK * np.array([0.25, 0.5, 0.75, 1.0, 1.0]), rtol=1e-6)


def test_cosine_schedule_shape():
    warmup, total = 10, 110
    cfg = OptimConfig(learning_rate=PEAK, schedule="cosine", warmup_steps=warmup, cooldown_steps=50)
    t = np.arange(total + 1)
    lr = lrs(cfg, total, t)
    np.testing.assert_allclose(lr[:warmup], PEAK * (t[:warmup] + 1) / warmup, rtol=1e-6)
    after = t[warmup:]
    expected = PEAK * 0.5 * (1 + np.cos(np.pi * (after - warmup) / (total - warmup)))
    np.testing.assert_allclose(lr[after], expected, rtol=1e-5, atol=1e-10)
    assert lr[warmup + (total - warmup) // 2] == pytest.approx(PEAK / 2, rel=1e-5)
    assert lr[total] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule():
    cfg = OptimConfig(learning_rate=PEAK, schedule="constant", warmup_steps=4, cooldown_steps=10)
    lr = lrs(cfg, 20, np.arange(21))
    np.testing.assert_allclose(lr[:4], PEAK * np.arange(1, 5) / 4, rtol=1e-6)
    np.testing.assert_allclose(lr[4:], PEAK, rtol=1e-6)  # no decay, no cool-down
    no_warmup = lrs(OptimConfig(learning_rate=PEAK, schedule="constant", warmup_steps=0), 20,
                    np.arange(20))
    np.testing.assert_allclose(no_warmup, PEAK, rtol=1e-6)


@pytest.mark.parametrize("changes, match", [
    (dict(optimizer="lamb"), "optimizer 'lamb'"),
    (dict(schedule="linear"), "schedule 'linear'"),
    (dict(learning_rate=0.0), "learning rate must be positive"),
    (dict(learning_rate=-1e-3), "learning rate must be positive"),
])
def test_invalid_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**changes)


# --- weight decay -------------------------------------------------------------------------


def expected_decay(name: str, wd: float, mult: float) -> float:
    """big_vision's rule: matmul kernels decay, the head kernel mult x more, nothing else."""
    if name == "head_kernel":
        return wd * mult
    if name.split("/")[-1].endswith("kernel"):
        return wd
    return 0.0


@pytest.mark.parametrize("optimizer", [
    "adafactor",
    # Same masking code after another scaler; compiling each chain costs seconds on CPU.
    pytest.param("adamw", marks=pytest.mark.slow),
    pytest.param("sgd", marks=pytest.mark.slow),
])
def test_weight_decay_masks_numerically(optimizer, tiny_cfg, random_params):
    """Zero gradients: clipping and the adaptive scaling give 0, so one update is exactly the
    decoupled decay -lr(0) * wd_leaf * param."""
    params = random_params(tiny_cfg, seed=5)
    wd, mult, warmup = 0.05, 20.0, 4
    cfg = OptimConfig(optimizer=optimizer, learning_rate=PEAK, warmup_steps=warmup,
                      weight_decay=wd, head_wd_mult=mult)
    tx = make_optimizer(cfg, params, total_steps=100)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    lr0 = PEAK / warmup
    flat_params, flat_updates = flatten(params), flatten(updates)
    assert flat_updates.keys() == flat_params.keys()
    kinds = {"decayed": 0, "head": 0, "not": 0}
    for name, p in flat_params.items():
        decay = expected_decay(name, wd, mult)
        u, p = np.asarray(flat_updates[name]), np.asarray(p)
        if decay == 0.0:
            np.testing.assert_array_equal(u, 0.0, err_msg=f"{name} must not be decayed")
            kinds["not"] += 1
        else:
            np.testing.assert_allclose(u, -lr0 * decay * p, rtol=1e-5, atol=1e-12, err_msg=name)
            kinds["head" if name == "head_kernel" else "decayed"] += 1
    # The tiny model has every kind of leaf the rule distinguishes.
    assert kinds["head"] == 1 and kinds["decayed"] >= 5 and kinds["not"] >= 10
    for name in ("pos_embedding", "patch_bias", "encoder_norm_scale", "encoder/q_norm_scale",
                 "head_bias", "map_head/probe"):
        assert np.all(np.asarray(flat_updates[name]) == 0), name
    for name in ("patch_kernel", "encoder/in_kernel", "encoder/out_kernel", "map_head/mlp_in_kernel"):
        assert np.any(np.asarray(flat_updates[name]) != 0), name


# --- Adafactor state ----------------------------------------------------------------------


def find_state(opt_state, kind):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
             if isinstance(s, kind)]
    assert len(found) == 1, f"expected one {kind.__name__} in the chain, found {len(found)}"
    return found[0]


def test_adafactor_factors_big_matrices_and_keeps_bf16_momentum():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
                        "bias": jnp.zeros((128,), jnp.float32)},
              "small_kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}
    tx = make_optimizer(OptimConfig(), params, total_steps=10)
    state = tx.init(params)
    fact = find_state(state, optax.FactoredState)
    # Factored: a row and a column statistic instead of a full second moment.
    assert fact.v_row["dense"]["kernel"].shape == (64,)
    assert fact.v_col["dense"]["kernel"].shape == (128,)
    assert fact.v["dense"]["kernel"].size == 1
    # Too small to factor (vectors, dims < 32): a full second moment.
    assert fact.v["dense"]["bias"].shape == (128,)
    assert fact.v["small_kernel"].shape == (8, 16)
    ema = find_state(state, optax.EmaState)
    assert {leaf.dtype for leaf in jax.tree.leaves(ema.ema)} == {jnp.dtype(jnp.bfloat16)}

    # First step: the capped decay 1 - (0+1)^-0.8 = 0, so the statistics are those of the
    # (globally clipped, since the chain clips first) gradient.
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    _, state = jax.jit(tx.update)(grads, state, params)
    fact = find_state(state, optax.FactoredState)
    norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))))
    assert norm > 1.0
    g2 = (np.asarray(grads["dense"]["kernel"]) / norm) ** 2
    np.testing.assert_allclose(fact.v_row["dense"]["kernel"], g2.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(fact.v_col["dense"]["kernel"], g2.mean(axis=0), rtol=1e-5)
    ema = find_state(state, optax.EmaState)
    assert ema.ema["dense"]["kernel"].dtype == jnp.bfloat16


def test_adamw_momentum_is_bf16():
    params = {"kernel": jnp.ones((4, 4), jnp.float32)}
    state = make_optimizer(OptimConfig(optimizer="adamw"), params, 10).init(params)
    adam = find_state(state, optax.ScaleByAdamState)
    assert adam.mu["kernel"].dtype == jnp.bfloat16
    assert adam.nu["kernel"].dtype == jnp.float32


# --- gradient clipping ----------------------------------------------------------------------


@pytest.mark.parametrize("scale, clipped", [(1e6, True), (0.1, False)])
def test_gradient_clipping_at_global_norm_one(scale, clipped):
    """sgd with float32 momentum and no decay: step 0's update is -lr * clip(g)."""
    lr = 0.5
    rng = np.random.default_rng(1)
    params = {"a_kernel": jnp.zeros((8, 8)), "b": {"bias": jnp.zeros((8,))}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    grads = jax.tree.map(lambda g: g * scale / optax.tree.norm(grads), grads)  # norm = scale
    cfg = OptimConfig(optimizer="sgd", learning_rate=lr, schedule="constant", warmup_steps=0,
                      weight_decay=0.0, grad_clip_norm=1.0, momentum_dtype="float32")
    tx = make_optimizer(cfg, params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = float(optax.tree.norm(updates))
    assert norm == pytest.approx(lr * (1.0 if clipped else scale), rel=1e-5)
    # Same direction as the gradient.
    np.testing.assert_allclose(updates["a_kernel"], -lr * grads["a_kernel"] / max(scale, 1.0),
                               rtol=1e-5, atol=1e-8)
    # --clip 0 turns clipping off.
    tx = make_optimizer(dataclasses.replace(cfg, grad_clip_norm=0.0), params, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(lr * scale, rel=1e-5)

