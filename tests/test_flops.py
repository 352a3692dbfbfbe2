"""The analytic FLOPs count (MFU's numerator) against XLA's own count and the paper."""

import jax
import jax.numpy as jnp
import pytest

from vit22b.config import preset
from vit22b.flops import flops_per_image
from vit22b.model import abstract_model, apply, split_params


def xla_forward_flops(cfg) -> float:
    """XLA's count for one image through an unrolled model (a scanned body is counted once)."""
    graphdef, params = split_params(abstract_model(cfg))
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    compiled = jax.jit(lambda p, x: apply(graphdef, p, x)[0]).lower(params, x).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"])


@pytest.mark.parametrize("block", ["parallel", "sequential"])
@pytest.mark.parametrize("head", ["map", "gap", "token"])
def test_forward_flops_match_xla(block, head):
    cfg = preset("S/16", depth=2, image_size=64, num_classes=100, scan=False, remat="none",
                 dtype_mm="float32", block=block, head=head)
    ours = flops_per_image(cfg)["forward"]
    xla = xla_forward_flops(cfg)
    assert abs(ours - xla) / xla < 0.02, (ours, xla)


def test_per_token_classifier_for_head_none():
    """head='none' classifies every token: the classifier term scales with the tokens."""
    cfg = preset("S/16", depth=1, image_size=64, num_classes=1000, scan=False, remat="none",
                 dtype_mm="float32", head="none")
    f = flops_per_image(cfg)
    assert f["classifier"] == 2 * 16 * 384 * 1000
    assert f["map_head"] == 0
    assert abs(f["forward"] - xla_forward_flops(cfg)) / f["forward"] < 0.02


def test_parts_add_up_and_train_is_three_forwards():
    for cfg in (preset("S/16"), preset("22B/14"), preset("B/16", head="token", block="sequential")):
        f = flops_per_image(cfg)
        parts = f["patch_embed"] + f["encoder"] + f["map_head"] + f["classifier"]
        assert f["forward"] == parts
        assert f["train"] == 3 * f["forward"]
        assert all(isinstance(v, int) and v >= 0 for v in f.values())


def test_encoder_flops_linear_in_depth():
    one = flops_per_image(preset("B/16", depth=1))["encoder"]
    assert flops_per_image(preset("B/16", depth=12))["encoder"] == 12 * one


def test_22b_matches_paper_arithmetic():
    cfg = preset("22B/14", image_size=224)
    f = flops_per_image(cfg)
    tokens, kernels = 256, 21_743_271_936
    attention = cfg.depth * 2 * 2 * tokens * tokens * cfg.width  # q.k^T and p.v
    want = 2 * kernels * tokens + attention
    assert abs(f["forward"] - want) / want < 0.01
    assert f["encoder"] == want  # the encoder term is exactly the block kernels plus attention
    # facts file: ~131.4 GFLOP per token for a training step, attention included
    assert f["train"] / tokens == pytest.approx(131.4e9, rel=0.01)
