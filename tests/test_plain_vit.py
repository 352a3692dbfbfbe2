"""bench/plain_vit.py: the hand-written JAX contender computes vit22b's function, in every layout."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

from plain_vit import Plain, forward, plain_params, train_step  # noqa: E402
from vit22b.config import preset  # noqa: E402
from vit22b.model import apply, init_model, split_params  # noqa: E402

CFG = preset("Ti/16", image_size=16, num_classes=5).replace(
    width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, dtype_mm="float32")


@pytest.fixture(scope="module")
def vit22b():
    """vit22b's parameters and its logits on 4 images (the reference)."""
    graphdef, params = split_params(init_model(CFG, seed=3))
    # big_vision's zero head would make every logit 0; a random one makes them depend on all layers
    params["head_kernel"] = 0.5 * jax.random.normal(jax.random.key(1), params["head_kernel"].shape)
    images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    logits = np.asarray(jax.jit(lambda p, x: apply(graphdef, p, x)[0])(params, images))
    assert np.abs(logits).max() > 0.1
    return params, images, logits


@pytest.mark.parametrize("plain", [Plain(), Plain(layout="heads"), Plain(loop="scan"),
                                   Plain(layout="heads", loop="scan", remat="dots_saveable")])
def test_plain_logits_equal_vit22b(vit22b, plain):
    params, images, want = vit22b
    run = jax.jit(lambda p, x: forward(CFG, plain, p, x))
    got = np.asarray(run(plain_params(CFG, params, plain), images))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_plain_train_step_loss_is_vit22b_cross_entropy(vit22b):
    params, images, logits = vit22b
    labels = np.array([0, 1, 4, 2])
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -log_probs[np.arange(4), labels].mean()
    flat = plain_params(CFG, params, Plain())
    tx = optax.sgd(0.1)
    _, _, loss = train_step(CFG, Plain(), tx)(flat, tx.init(flat), images, labels)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_configs_outside_the_paper_defaults_are_refused(vit22b):
    params = vit22b[0]
    with pytest.raises(ValueError, match="paper's defaults in float32 only.*'norm': 'layer'"):
        plain_params(CFG.replace(norm="layer"), params, Plain())
