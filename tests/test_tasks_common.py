"""vit22b.tasks.common: where results go, standardisation vs numpy, the head fitter (against optax
Adam step by step, and its non-finite stop), batched application, and that loading a backbone reads
the weights file once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_random_params
from vit22b import weights
from vit22b.config import preset
from vit22b.tasks import common


def test_results_go_to_out_else_workdir_else_the_checkpoint_dir(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    rule = common.results_path
    out = tmp_path / "x.json"
    assert rule("probe", checkpoint=ckpt, out=out, workdir=tmp_path / "w") == out
    assert rule("segment", checkpoint=ckpt, workdir=tmp_path / "w") == tmp_path / "w" / "segment.json"
    assert rule("video", checkpoint=ckpt) == ckpt / "video.json"
    assert rule("video", checkpoint=ckpt / "model.safetensors") == ckpt / "video.json"  # a file: its dir


def test_standardise_matches_numpy_over_the_given_axes():
    rng = np.random.default_rng(0)
    tr, val = rng.normal(3.0, 2.0, (20, 3, 5)), rng.normal(size=(4, 3, 5))
    (s_tr, s_val), (mean, std) = common.standardise(tr, val)
    want_mean, want_std = tr.mean(0), tr.std(0) + 1e-6
    np.testing.assert_allclose(s_val, (val - want_mean) / want_std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, want_mean)
    assert s_tr.dtype == np.float32 and mean.shape == (3, 5)
    (_, s_val), (mean, std) = common.standardise(tr, val, axes=(0, 1))  # per channel (last axis)
    flat = tr.reshape(-1, 5)
    np.testing.assert_allclose(s_val, (val - flat.mean(0)) / (flat.std(0) + 1e-6), rtol=1e-5, atol=1e-6)
    assert std.shape == (1, 5)


def test_fit_head_is_adamw_with_warmup_cosine_step_for_step():
    """Three chunks of the fitter against optax.adamw on the same schedule, by hand: same params
    and same per-step losses (decay on the matrix only, the clip bounding the first steps)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((16, 3)).astype(np.float32), rng.standard_normal((16, 2)).astype(np.float32)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2)}

    def loss_fn(p, data, step):
        xs, ys = data
        return jnp.mean((xs @ p["w"] + p["b"] - ys) ** 2)

    got, losses = common.fit_head(loss_fn, params, data=(x, y), steps=7, lr=0.1, warmup=2, wd=0.5, clip=1.0,
                                  chunk=3)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 7)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=0.5, mask={"w": True, "b": False}))
    p, opt, want = params, tx.init(params), []
    for _ in range(7):
        loss, grads = jax.value_and_grad(loss_fn)(p, (x, y), 0)
        updates, opt = tx.update(grads, opt, p)
        p = optax.apply_updates(p, updates)
        want.append(float(loss))
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    for k in ("w", "b"):
        np.testing.assert_allclose(got[k], p[k], rtol=1e-5, atol=1e-6)


def test_fit_head_stops_on_a_non_finite_loss_naming_the_fix():
    def loss_fn(p, data, step):
        return jnp.where(step >= 4, jnp.nan, jnp.sum(p ** 2))

    with pytest.raises(common.TaskError, match="the demo loss became nan at step 5: lower the learning rate"):
        common.fit_head(loss_fn, jnp.ones(3), steps=10, lr=0.1, desc="demo", chunk=3)
    with pytest.raises(ValueError, match="at least 1 step"):  # TaskError is a ValueError
        common.fit_head(loss_fn, jnp.ones(3), steps=0, lr=0.1)


def test_apply_batched_pads_the_last_batch_and_drops_its_outputs():
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x * 2

    out = common.apply_batched(fn, np.arange(10.0).reshape(5, 2), 2, prepare=lambda a: a + 1)
    np.testing.assert_array_equal(out, 2 * (np.arange(10.0).reshape(5, 2) + 1))
    assert shapes == [(2, 2)] * 3  # one compiled shape


def test_load_backbone_reads_the_weights_once(tmp_path, monkeypatch):
    cfg = preset("mu/4", image_size=8, num_classes=3)
    weights.save_model(tmp_path, make_random_params(cfg), cfg)
    calls = []
    read = weights.read_safetensors
    monkeypatch.setattr(weights, "read_safetensors", lambda path: calls.append(path) or read(path))
    model = common.load_backbone(tmp_path, 12)  # another size: the posemb is resampled
    assert model.cfg.image_size == 12 and len(calls) == 1
    with pytest.raises(common.TaskError, match="multiple of the checkpoint's patch size 4: use e.g. 12"):
        common.load_backbone(tmp_path, 13)
    assert len(calls) == 1  # the size is checked against the header, before any weights are read
