"""Golden test against timm (PyTorch), the peer implementation: tests/data/timm/README.md."""

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from vit22b.config import ConfigError
from vit22b.model import abstract_model, split_params
from vit22b.timm_convert import config_from_timm, flat_to_timm, timm_to_flat
from vit22b.weights import flatten, unflatten

GOLDEN = Path(__file__).parent / "data" / "timm" / "tiny_reference.safetensors"
KEYS_TXT = Path(__file__).parent / "data" / "timm" / "tiny_state_dict_keys.txt"
ATOL = 1e-5

VARIANTS = {
    "logits": dict(norm="layer", gelu_approximate=False),
    "logits_gelu_tanh": dict(norm="layer", gelu_approximate=True),
    "logits_rmsnorm": dict(norm="rms", gelu_approximate=False),
    "logits_rmsnorm_gelu_tanh": dict(norm="rms", gelu_approximate=True),
    "logits_rms_body_lnqk_gelu_tanh": dict(norm="rms", qk_norm_type="layer", gelu_approximate=True),
}


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN))


@pytest.fixture(scope="module")
def state(golden) -> dict[str, np.ndarray]:
    return {k.removeprefix("param/"): v for k, v in golden.items() if k.startswith("param/")}


def convert(state, **kwargs):
    cfg = config_from_timm(state, num_heads=4, dtype_mm="float32", **kwargs)
    return cfg, timm_to_flat(state, cfg)


def test_state_dict_matches_documented_keys(state):
    documented = {}
    for line in KEYS_TXT.read_text().splitlines():
        if m := re.match(r"(\S+)\s+\(([\d, ]+)\)", line):
            documented[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d.strip())
    assert len(documented) == 32
    assert {k: v.shape for k, v in state.items()} == documented


def test_config_inferred_from_shapes(state):
    cfg = config_from_timm(state, num_heads=4)
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) == (64, 2, 256, 4)
    assert (cfg.patch_size, cfg.image_size, cfg.in_channels, cfg.num_classes) == (14, 56, 3, 10)
    assert (cfg.block, cfg.head, cfg.posemb, cfg.norm) == ("parallel", "map", "learn", "layer")
    assert cfg.qk_norm and not cfg.qkv_bias and not cfg.norm_bias
    assert cfg.mlp_bias and cfg.out_bias and cfg.patch_bias and cfg.map_bias
    assert not cfg.gelu_approximate


def test_converted_keys_and_shapes_match_model(state):
    cfg, flat = convert(state, norm="layer")
    _, params = split_params(abstract_model(cfg))
    want = flatten(params)
    assert set(flat) == set(want)
    for name, leaf in want.items():
        assert flat[name].shape == tuple(leaf.shape), name
        assert flat[name].dtype == np.float32


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_timm(variant, golden, state, forward):
    cfg, flat = convert(state, **VARIANTS[variant])
    logits, _ = forward(cfg)(unflatten(flat), golden["input_nhwc"])
    np.testing.assert_allclose(logits, golden[variant], rtol=0, atol=ATOL)


def test_intermediates_and_float64_match_timm(golden, state, forward):
    cfg, flat = convert(state, **VARIANTS["logits"])
    logits, out = forward(cfg, return_layers=(0, 1))(unflatten(flat), golden["input_nhwc"])
    np.testing.assert_allclose(logits, golden["logits_f64"], rtol=0, atol=ATOL)
    pairs = {"stem": "patch_embed", "with_posemb": "pos_embed_added", "block_0": "blocks.0",
             "block_1": "blocks.1", "encoded": "norm", "pre_logits": "pooled"}
    for ours, theirs in pairs.items():
        np.testing.assert_allclose(out[ours], golden[f"act/{theirs}"], rtol=0, atol=ATOL, err_msg=ours)


def test_input_layouts_agree(golden):
    np.testing.assert_array_equal(golden["input_nchw"].transpose(0, 2, 3, 1), golden["input_nhwc"])


def test_golden_test_is_sensitive_to_layout_mistakes(golden, state, forward):
    """Plausible converter mistakes (head order, MLP unit pairing, a missing transpose) all move
    the logits far beyond the tolerance used above."""
    cfg, flat = convert(state, **VARIANTS["logits"])
    D, H, hd = cfg.width, cfg.num_heads, cfg.head_dim
    run = forward(cfg)
    x = golden["input_nhwc"]

    def logits_with(**changes):
        return np.asarray(run(unflatten(dict(flat, **changes)), x)[0])

    np.testing.assert_allclose(logits_with(), golden["logits"], atol=ATOL)
    in_k, out_k = flat["encoder/in_kernel"], flat["encoder/out_kernel"]
    q_heads_reversed = np.concatenate([in_k[:, :, ::-1, :hd], in_k[:, :, :, hd:]], axis=-1)
    mlp_rolled = np.concatenate([in_k[..., :3 * hd], np.roll(in_k[..., 3 * hd:], 1, axis=2)], -1)
    qk_swapped = np.concatenate([in_k[..., hd:2 * hd], in_k[..., :hd], in_k[..., 2 * hd:]], -1)
    # attention rows read as (head_dim, heads) instead of timm's head-major (heads, head_dim)
    dim_major = out_k[:, :, :hd].reshape(-1, hd, H, D).swapaxes(1, 2)  # [L, H, hd, D]
    attn_out_mixed = np.concatenate([dim_major, out_k[:, :, hd:]], axis=2)
    untransposed_q = state["attn_pool.q.weight"].reshape(D, H, hd)
    mistakes = {
        "q heads reversed": {"encoder/in_kernel": q_heads_reversed},
        "mlp units paired with the wrong out rows": {"encoder/in_kernel": mlp_rolled},
        "q and k swapped": {"encoder/in_kernel": qk_swapped},
        "attn-out rows not head-major": {"encoder/out_kernel": attn_out_mixed},
        "MAP query kernel not transposed": {"map_head/query_kernel": untransposed_q},
    }
    for what, changes in mistakes.items():
        diff = np.abs(logits_with(**changes) - golden["logits"]).max()
        assert diff > 100 * ATOL, f"{what}: logits moved only {diff}"


def test_wrong_head_count_is_a_config_error(state):
    with pytest.raises(ConfigError, match="num_heads must be 4"):
        config_from_timm(state, num_heads=2)


def test_export_round_trip_is_exact(state):
    for kwargs in VARIANTS.values():
        cfg, flat = convert(state, **kwargs)
        back = flat_to_timm(flat, cfg)
        assert set(back) == set(state)
        for key, value in state.items():
            assert back[key].shape == value.shape, key
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_export_from_our_layout_round_trips(tiny_cfg, random_params):
    """The other direction, starting from our params (norm_bias on, so the bias paths run)."""
    cfg = tiny_cfg.replace(norm_bias=True)
    flat = {k: np.asarray(v) for k, v in flatten(random_params(cfg)).items()}
    state = flat_to_timm(flat, cfg)
    assert "blocks.0.in_norm.bias" in state and "norm.bias" in state
    assert state["blocks.0.in_proj.weight"].shape == (128 + 3 * 32, 32)
    again = timm_to_flat(state, cfg)
    assert set(again) == set(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


@pytest.mark.parametrize("changes, fragment", [
    (dict(class_token=True), "prefix tokens 1"),
    (dict(head="gap"), "head='gap'"),
    (dict(qkv_bias=True), "qkv_bias=True"),
    (dict(mlp_bias=False), "mlp_bias and out_bias"),
])
def test_unsupported_configs_raise(changes, fragment, state):
    cfg = config_from_timm(state, num_heads=4, **changes)
    with pytest.raises(ConfigError, match=fragment):
        timm_to_flat(state, cfg)
    with pytest.raises(ConfigError, match=fragment):
        flat_to_timm({}, cfg)


@pytest.mark.parametrize("key", ["patch_embed.proj.weight", "pos_embed", "blocks.0.in_proj.weight",
                                 "attn_pool.latent"])
def test_missing_required_key_is_named(key, state):
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_timm(broken, num_heads=4)


@pytest.mark.parametrize("key", ["blocks.1.in_norm.weight", "attn_pool.mlp.fc2.weight"])
def test_missing_other_key_is_named(key, state):
    broken = {k: v for k, v in state.items() if k != key}
    cfg = config_from_timm(broken, num_heads=4)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        timm_to_flat(broken, cfg)


def test_unused_timm_tensors_are_rejected(state):
    extra = dict(state, cls_token=np.zeros((1, 1, 64), np.float32))
    cfg = config_from_timm(extra, num_heads=4)
    with pytest.raises(ConfigError, match="cls_token"):
        timm_to_flat(extra, cfg)
