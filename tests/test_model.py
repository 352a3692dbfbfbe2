"""The ViT model: shapes for every switch, parameter sets, gradients, intermediates, errors."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vit22b.config import ConfigError, ModelConfig, preset
from vit22b.model import abstract_model, apply, count_params, init_model, logical_axes, split_params
from vit22b.posemb import sincos2d
from vit22b.weights import flatten

B = 2


def param_names(cfg: ModelConfig) -> set[str]:
    _, params = split_params(abstract_model(cfg))
    return set(flatten(params))


def output_shapes(cfg: ModelConfig, **kwargs) -> dict[str, tuple[int, ...]]:
    """Shapes of (logits, intermediates) from tracing alone (no compile)."""
    graphdef, params = split_params(abstract_model(cfg))
    x = jax.ShapeDtypeStruct((B, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    logits, out = jax.eval_shape(lambda p, x: apply(graphdef, p, x, **kwargs), params, x)
    assert out["logits"].shape == logits.shape
    return {k: tuple(v.shape) for k, v in out.items()}


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("head, block", itertools.product(["map", "gap", "token", "none"],
                                                          ["parallel", "sequential"]))
def test_forward_shapes_heads_and_blocks(head, block, tiny2_cfg):
    cfg = tiny2_cfg.replace(head=head, block=block)
    N, D, C = 16, 32, 10
    shapes = output_shapes(cfg, return_layers=(1,), attn_stats=True)
    pooled = (B, N, D) if head == "none" else (B, D)
    # token intermediates are the patch grid; the class token's output is `prefix`
    assert shapes == {
        "stem": (B, N, D), "with_posemb": (B, N, D), "block_1": (B, N, D), "encoded": (B, N, D),
        "attn_logit_max": (2,), "pre_logits": pooled, "logits": pooled[:-1] + (C,),
        **({"prefix": (B, 1, D)} if head == "token" else {})}


@pytest.mark.parametrize("changes, prefix", [
    (dict(class_token=True, num_registers=4, class_posemb=True, pre_norm=True, fc_norm=True,
          layer_scale=True, act="quick_gelu", head="gap"), 5),
    (dict(num_registers=2, head="map", norm_bias=True, pre_norm=True), 2),
])
def test_other_vits_switches_shapes(changes, prefix, tiny2_cfg):
    cfg = tiny2_cfg.replace(block="sequential", **changes)
    assert cfg.num_prefix_tokens == prefix and cfg.num_tokens == 16 + prefix
    shapes = output_shapes(cfg, return_layers=(1,))
    assert shapes["encoded"] == shapes["block_1"] == (B, 16, 32) and shapes["prefix"] == (B, prefix, 32)
    names = set(flatten(split_params(abstract_model(cfg))[1]))
    assert {"reg_tokens", "pre_norm_scale"} <= names
    assert ("fc_norm_scale" in names) == cfg.fc_norm != ("encoder_norm_scale" in names)
    assert ("prefix_pos_embedding" in names) == cfg.class_posemb
    assert ("encoder/attn_scale" in names) == cfg.layer_scale


def test_defaults_of_the_new_switches_are_vit22b():
    cfg = ModelConfig()
    assert (cfg.class_token, cfg.num_registers, cfg.class_posemb, cfg.pre_norm, cfg.fc_norm,
            cfg.layer_scale, cfg.act) == (None, 0, False, False, False, False, "gelu")
    assert not cfg.has_class_token and cfg.replace(head="token").has_class_token


@pytest.mark.parametrize("changes", [dict(norm="layer"), dict(norm="layer", norm_bias=True),
                                     dict(posemb="sincos2d"), dict(qk_norm=False),
                                     dict(qk_norm_type="layer"), dict(num_classes=0),
                                     dict(qkv_bias=True, norm_bias=True),
                                     dict(mlp_bias=False, out_bias=False, patch_bias=False,
                                          map_bias=False),
                                     dict(patch_size=8, image_size=32, in_channels=1)])
def test_forward_shapes_switches(changes, tiny_cfg):
    cfg = tiny_cfg.replace(**changes)
    shapes = output_shapes(cfg)
    N, D = cfg.num_patches, cfg.width
    C = cfg.num_classes or D  # no classifier: logits are the pooled features
    assert shapes["stem"] == shapes["encoded"] == (B, N, D)
    assert shapes["pre_logits"] == (B, D)
    assert shapes["logits"] == (B, C)


# --- parameter sets --------------------------------------------------------------------------

MAP_BIASES = {"map_head/query_bias", "map_head/kv_bias", "map_head/out_bias"}
MAP_ALL = MAP_BIASES | {f"map_head/{n}" for n in (
    "probe", "query_kernel", "kv_kernel", "out_kernel", "norm_scale", "mlp_in_kernel",
    "mlp_out_kernel", "mlp_in_bias", "mlp_out_bias")}


@pytest.mark.parametrize("changes, added, removed", [
    (dict(qkv_bias=True), {"encoder/qkv_bias"}, set()),
    (dict(norm_bias=True), {"encoder/norm_bias", "encoder/q_norm_bias", "encoder/k_norm_bias",
                            "encoder_norm_bias", "map_head/norm_bias"}, set()),
    (dict(mlp_bias=False), set(), {"encoder/mlp_in_bias", "map_head/mlp_in_bias",
                                   "map_head/mlp_out_bias"}),
    # parallel: the attn-out and MLP-out outputs are summed, so one bias serves both (out_bias=False
    # alone is refused: test_out_bias_alone_is_refused_in_the_parallel_block)
    (dict(mlp_bias=False, out_bias=False), set(), {"encoder/mlp_in_bias", "encoder/out_bias",
                                                   "map_head/mlp_in_bias", "map_head/mlp_out_bias"}),
    (dict(patch_bias=False), set(), {"patch_bias"}),
    (dict(map_bias=False), set(), MAP_BIASES),
    (dict(qk_norm=False), set(), {"encoder/q_norm_scale", "encoder/k_norm_scale"}),
    (dict(posemb="sincos2d"), set(), {"pos_embedding"}),
    (dict(num_classes=0), set(), {"head_kernel", "head_bias"}),
    (dict(head="token"), {"cls_token"}, MAP_ALL),
    (dict(head="gap"), set(), MAP_ALL),
    (dict(head="none"), set(), MAP_ALL),
    (dict(conv_stem_channels=8), {"stem_conv_kernel", "stem_conv_bias"}, set()),
])
def test_switches_change_the_parameter_set(changes, added, removed, tiny_cfg):
    base = param_names(tiny_cfg)
    new = param_names(tiny_cfg.replace(**changes))
    assert new - base == added
    assert base - new == removed


def test_sequential_bias_switches(tiny_cfg):
    seq = tiny_cfg.replace(block="sequential")
    base = param_names(seq)
    assert base - param_names(seq.replace(out_bias=False)) == {"encoder/attn_out_bias"}
    assert base - param_names(seq.replace(mlp_bias=False)) == {
        "encoder/mlp_in_bias", "encoder/mlp_out_bias", "map_head/mlp_in_bias", "map_head/mlp_out_bias"}
    assert param_names(seq.replace(norm_bias=True)) - base == {
        "encoder/attn_norm_bias", "encoder/mlp_norm_bias", "encoder/q_norm_bias",
        "encoder/k_norm_bias", "encoder_norm_bias", "map_head/norm_bias"}


def test_all_biases_off_leaves_only_the_classifier_bias(tiny_cfg):
    cfg = tiny_cfg.replace(norm_bias=False, qkv_bias=False, mlp_bias=False, out_bias=False,
                           patch_bias=False, map_bias=False)
    assert {n for n in param_names(cfg) if "bias" in n} == {"head_bias"}


def test_count_params_equals_timm():
    """Against a number fixed outside this code: timm's vit_base_patch16_224 has 86,567,656
    parameters (class token, learned posemb over 197 tokens, pre-LN sequential blocks with biases,
    no QK norm), the paper's switches turned back to the original ViT. (Table 1's 21,743M kernel
    parameters of ViT-22B: tests/test_config.py.)"""
    timm_b16 = preset("B/16", block="sequential", head="token", norm="layer", norm_bias=True,
                      qkv_bias=True, qk_norm=False, class_posemb=True, gelu_approximate=False,
                      image_size=224, num_classes=1000)
    assert count_params(split_params(abstract_model(timm_b16))[1]) == 86_567_656


def test_logical_axes_match_params(tiny_cfg):
    for cfg in (tiny_cfg, tiny_cfg.replace(block="sequential", head="token", norm_bias=True,
                                           qkv_bias=True)):
        model = abstract_model(cfg)
        _, params = split_params(model)
        axes = logical_axes(model)
        is_axes = lambda v: isinstance(v, tuple)  # noqa: E731
        assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
        flat_axes, flat_params = flatten(axes), flatten(params)
        for name, leaf in flat_params.items():
            names = flat_axes[name]
            assert len(names) == leaf.ndim, (name, names, leaf.shape)
            assert all(a is None or isinstance(a, str) for a in names)
            if name.startswith("encoder/"):
                assert names[0] == "layers", name
    flat = flatten(logical_axes(abstract_model(tiny_cfg)))
    assert flat["encoder/in_kernel"] == ("layers", "embed", "heads", "fused_in")
    assert flat["encoder/out_kernel"] == ("layers", "heads", "fused_out", "embed")
    assert flat["head_kernel"] == ("embed", "classes")


# --- numerics --------------------------------------------------------------------------------


def np_patchify_embed(images, kernel, bias):
    """Non-overlapping conv written out: token (r, c) is patch rows r*p.., cols c*p..."""
    Bn, S, _, C = images.shape
    p, D = kernel.shape[0], kernel.shape[-1]
    g = S // p
    out = np.zeros((Bn, g * g, D))
    for r in range(g):
        for c in range(g):
            patch = images[:, r * p:(r + 1) * p, c * p:(c + 1) * p, :]
            out[:, r * g + c] = np.einsum("bijc,ijcd->bd", patch, kernel) + bias
    return out


def np_norm(x, scale, bias, kind, eps=1e-6):
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale
    return y if bias is None else y + bias


def test_intermediates(tiny2_cfg, images, random_params, forward):
    cfg = tiny2_cfg
    params = random_params(cfg)
    logits, out = forward(cfg, return_layers=(0, -1), attn_stats=True)(params, images)
    assert set(out) == {"stem", "with_posemb", "block_0", "block_1", "encoded", "pre_logits", "logits",
                        "attn_logit_max"}
    p = jax.tree.map(np.asarray, params)
    stem = np_patchify_embed(images.astype(np.float64), p["patch_kernel"], p["patch_bias"])
    np.testing.assert_allclose(out["stem"], stem, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["with_posemb"], stem + p["pos_embedding"], rtol=1e-5, atol=1e-5)
    # block -1 is the last block: the final norm of it is `encoded`
    enc = np_norm(np.asarray(out["block_1"], np.float64), p["encoder_norm_scale"], None, "rms")
    np.testing.assert_allclose(out["encoded"], enc, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["block_0"], out["block_1"])
    np.testing.assert_allclose(logits, out["logits"])
    want_logits = np.asarray(out["pre_logits"], np.float64) @ p["head_kernel"] + p["head_bias"]
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert out["attn_logit_max"].shape == (cfg.depth,)
    assert np.all(np.isfinite(out["attn_logit_max"]))


def test_intermediates_default_keys_and_bad_layer(tiny2_cfg):
    assert set(output_shapes(tiny2_cfg)) == {"stem", "with_posemb", "encoded", "pre_logits", "logits"}
    assert "block_0" in output_shapes(tiny2_cfg, return_layers=(-2,))
    for bad in (2, -3):
        with pytest.raises(ValueError, match=f"block {bad} does not exist"):
            output_shapes(tiny2_cfg, return_layers=(bad,))


@pytest.mark.parametrize("changes", [
    dict(head="gap", block="sequential", norm="layer", norm_bias=True),
    dict(head="token"),
    dict(head="none", posemb="sincos2d"),
])
def test_pooling_heads_and_posembs(changes, tiny_cfg, images, random_params, forward):
    cfg = tiny_cfg.replace(**changes)
    params = random_params(cfg)
    p = jax.tree.map(np.asarray, params)
    logits, out = forward(cfg)(params, images)
    stem, enc = np.asarray(out["stem"]), np.asarray(out["encoded"])
    if cfg.posemb == "sincos2d":
        np.testing.assert_allclose(out["with_posemb"], stem + np.asarray(sincos2d(4, 32)), atol=1e-6)
    if cfg.head == "gap":
        np.testing.assert_allclose(out["pre_logits"], enc.mean(1), rtol=1e-5, atol=1e-6)
    elif cfg.head == "token":
        x = np.asarray(out["with_posemb"])
        assert x.shape[1] == 16  # the class token is prepended after the posemb (big_vision)
        np.testing.assert_allclose(x, stem + p["pos_embedding"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["pre_logits"], np.asarray(out["prefix"])[:, 0])
    else:
        np.testing.assert_allclose(out["pre_logits"], enc)
    want = np.asarray(out["pre_logits"], np.float64) @ p["head_kernel"] + p["head_bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_map_attention_weights_match_numpy(tiny_cfg, images, random_params, forward):
    """The MAP probe's softmax weights over the encoded tokens [B, H, N] (for attention pictures),
    from numpy on the same params; each head's weights sum to 1."""
    cfg = tiny_cfg.replace(num_heads=2)
    params = random_params(cfg)
    _, out = forward(cfg)(params, images)
    model = nnx.merge(split_params(abstract_model(cfg))[0], params)
    got = np.asarray(model.map_head.attention_weights(out["encoded"]))
    p = {k: np.asarray(v, np.float64) for k, v in flatten(params).items() if k.startswith("map_head/")}
    x = np.asarray(out["encoded"], np.float64)
    q = np.einsum("d,dhk->hk", p["map_head/probe"][0, 0], p["map_head/query_kernel"])
    q = q + p["map_head/query_bias"]
    k = np.einsum("bnd,dhk->bnhk", x, p["map_head/kv_kernel"][:, 0]) + p["map_head/kv_bias"][0]
    logits = np.einsum("hk,bnhk->bhn", q, k) / np.sqrt(cfg.head_dim)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert got.shape == (2, 2, cfg.num_patches)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def np_conv3x3_gelu(images, kernel, bias):
    """SAME 3x3 convolution, stride 1, then tanh-GELU: nine shifted einsums over a zero-padded image."""
    H, W = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum("bhwc,cs->bhws", padded[:, i:i + H, j:j + W], kernel[i, j])
            for i in range(3) for j in range(3)) + bias
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


def test_conv_stem_then_patch_embedding(tiny_cfg, images, random_params, forward):
    cfg = tiny_cfg.replace(conv_stem_channels=5)
    params = random_params(cfg)
    _, out = forward(cfg)(params, images)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    assert p["stem_conv_kernel"].shape == (3, 3, cfg.in_channels, 5)
    assert p["patch_kernel"].shape == (cfg.patch_size, cfg.patch_size, 5, cfg.width)
    features = np_conv3x3_gelu(np.asarray(images, np.float64), p["stem_conv_kernel"], p["stem_conv_bias"])
    stem = np_patchify_embed(features, p["patch_kernel"], p["patch_bias"])
    np.testing.assert_allclose(out["stem"], stem, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes", [
    dict(norm_bias=True, qkv_bias=True),  # parallel + MAP with every bias switched on
    dict(conv_stem_channels=4),
    dict(block="sequential", head="token", norm="layer"),
])
def test_every_parameter_gets_a_gradient(changes, tiny2_cfg, images, random_params):
    cfg = tiny2_cfg.replace(**changes)
    params = random_params(cfg)  # classifier nonzero, unlike a fresh (zero-head) init
    graphdef, _ = split_params(abstract_model(cfg))
    target = np.random.default_rng(5).standard_normal((B, cfg.num_classes))

    def loss(p):
        logits, _ = apply(graphdef, p, images)
        return jnp.sum(logits * target)

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # A bias added to the normalised keys adds q.b to every logit of a query, which softmax
    # ignores: its gradient is zero by construction (as for any key bias feeding softmax directly).
    inert = {"encoder/k_norm_bias"}
    for name, g in flatten(grads).items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        if name in inert:
            assert np.abs(g).max() < 1e-5, name
        else:
            assert np.abs(g).max() > 1e-6, f"{name} gets no gradient"
    # every layer of the stacked encoder params is reached
    for name, g in flatten(grads["encoder"]).items():
        if f"encoder/{name}" in inert:
            continue
        per_layer = np.abs(np.asarray(g)).reshape(cfg.depth, -1).max(1)
        assert np.all(per_layer > 1e-6), name


def test_wrong_input_shape_names_expected_shape(tiny_cfg, random_params):
    graphdef, _ = split_params(abstract_model(tiny_cfg))
    model = nnx.merge(graphdef, random_params(tiny_cfg))
    for bad in [(2, 32, 32, 3), (2, 16, 16, 1), (16, 16, 3), (2, 3, 16, 16)]:
        with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]") as info:
            model(jnp.zeros(bad))
        assert str(tuple(bad)) in str(info.value)


@pytest.mark.slow
def test_real_initialisation(tiny_cfg, forward):
    cfg = tiny_cfg.replace(head_bias_init=-10.0)
    params = jax.jit(lambda: split_params(init_model(cfg, seed=0))[1])()
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    assert set(flat) == param_names(cfg)
    assert np.all(flat["head_kernel"] == 0)  # zero-initialised classifier (big_vision)
    assert np.all(flat["head_bias"] == -10.0)
    for name, v in flat.items():
        assert v.dtype == np.float32, name
        if name.endswith("_scale"):
            assert np.all(v == 1.0), name
    D, M = cfg.width, cfg.mlp_dim
    bound = np.sqrt(6 / (D + D))
    q = flat["encoder/in_kernel"][..., :cfg.head_dim]
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.8 * bound
    mlp_in = flat["encoder/in_kernel"][..., 3 * cfg.head_dim:]
    assert np.abs(mlp_in).max() <= np.sqrt(6 / (D + M))
    assert np.std(flat["pos_embedding"]) == pytest.approx(D**-0.5, rel=0.2)
    # distinct random streams per tensor: the q, k and v kernels differ
    k = flat["encoder/in_kernel"][..., cfg.head_dim:2 * cfg.head_dim]
    assert not np.allclose(q, k)
    logits, _ = forward(cfg)(params, np.ones((1, 16, 16, 3), np.float32))
    np.testing.assert_allclose(logits, -10.0)  # a fresh head predicts its bias


def test_simulated_devices_for_sharding_tests():
    flags = os.environ.get("XLA_FLAGS", "")
    if jax.default_backend() != "cpu" or "device_count=8" not in flags:
        pytest.skip("XLA_FLAGS was set by the caller without 8 host devices")
    assert jax.device_count() == 8


def test_out_bias_alone_is_refused_in_the_parallel_block(tiny_cfg):
    """It would change nothing (the fused out-projection has one bias for both branches)."""
    with pytest.raises(ConfigError, match="one fused bias.*--no-mlp-bias"):
        tiny_cfg.replace(out_bias=False)
    assert "encoder/attn_out_bias" not in param_names(tiny_cfg.replace(block="sequential", out_bias=False))
