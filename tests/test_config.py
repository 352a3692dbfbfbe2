"""ModelConfig, presets and validation."""

import dataclasses
import json
import time

import numpy as np
import pytest

from vit22b.config import PRESETS, ConfigError, ModelConfig, parse_preset, preset
from vit22b.model import abstract_model, split_params
from vit22b.weights import flatten


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    _, params = split_params(abstract_model(cfg))
    return {name: tuple(leaf.shape) for name, leaf in flatten(params).items()}


def expected_default_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a default (ViT-22B-style) config, written out from the layout docs."""
    L, D, H, M, p = cfg.depth, cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.patch_size
    hd, Mh, N, C = D // H, M // H, (cfg.image_size // p) ** 2, cfg.num_classes
    return {
        "patch_kernel": (p, p, 3, D), "patch_bias": (D,), "pos_embedding": (1, N, D),
        "encoder/in_kernel": (L, D, H, 3 * hd + Mh), "encoder/out_kernel": (L, H, hd + Mh, D),
        "encoder/norm_scale": (L, D), "encoder/q_norm_scale": (L, hd), "encoder/k_norm_scale": (L, hd),
        "encoder/mlp_in_bias": (L, H, Mh), "encoder/out_bias": (L, D),
        "encoder_norm_scale": (D,),
        "map_head/probe": (1, 1, D), "map_head/query_kernel": (D, H, hd),
        "map_head/kv_kernel": (D, 2, H, hd), "map_head/out_kernel": (H, hd, D),
        "map_head/query_bias": (H, hd), "map_head/kv_bias": (2, H, hd), "map_head/out_bias": (D,),
        "map_head/norm_scale": (D,), "map_head/mlp_in_kernel": (D, M), "map_head/mlp_out_kernel": (M, D),
        "map_head/mlp_in_bias": (M,), "map_head/mlp_out_bias": (D,),
        "head_kernel": (D, C), "head_bias": (C,),
    }


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_expected_shapes(name):
    cfg = preset(name)
    width, depth, mlp, heads = PRESETS[name]
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads) == (width, depth, mlp, heads)
    shapes = param_shapes(cfg)
    assert shapes == expected_default_shapes(cfg)
    # The fused kernels hold exactly the unfused q, k, v, attn-out and both MLP matrices.
    n_in = np.prod(shapes["encoder/in_kernel"])
    n_out = np.prod(shapes["encoder/out_kernel"])
    assert n_in == depth * width * (3 * width + mlp)
    assert n_out == depth * (width + mlp) * width


def test_sequential_preset_shapes():
    cfg = preset("B/16", block="sequential")
    shapes = param_shapes(cfg)
    L, D, H, M = 12, 768, 12, 3072
    enc = {k: v for k, v in shapes.items() if k.startswith("encoder/")}
    assert enc == {
        "encoder/attn_norm_scale": (L, D), "encoder/mlp_norm_scale": (L, D),
        "encoder/q_norm_scale": (L, 64), "encoder/k_norm_scale": (L, 64),
        "encoder/qkv_kernel": (L, D, H, 3 * 64), "encoder/attn_out_kernel": (L, H, 64, D),
        "encoder/attn_out_bias": (L, D), "encoder/mlp_in_kernel": (L, D, M),
        "encoder/mlp_out_kernel": (L, M, D), "encoder/mlp_in_bias": (L, M),
        "encoder/mlp_out_bias": (L, D),
    }


def test_22b_block_kernels_match_paper_count():
    start = time.perf_counter()
    cfg = preset("22B/14")
    _, params = split_params(abstract_model(cfg))
    elapsed = time.perf_counter() - start
    enc = params["encoder"]
    total = int(np.prod(enc["in_kernel"].shape)) + int(np.prod(enc["out_kernel"].shape))
    assert total == 21_743_271_936  # Table 1: 21,743M = 48 * (4 D^2 + 2 D M)
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.head_dim) == (6144, 48, 24576, 48, 128)
    assert cfg.num_patches == 256
    assert elapsed < 5.0, f"abstract construction of 22B took {elapsed:.1f}s"


def test_preset_patch_parsing():
    assert preset("B/16").patch_size == 16
    assert preset("B/16").width == 768
    assert preset("B").patch_size == ModelConfig().patch_size
    assert parse_preset("22B/14") == ("22B", 14)
    assert parse_preset("So400m") == ("So400m", None)
    assert preset("S/16", depth=2, image_size=64).depth == 2


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda: preset("Z/16"), ["unknown preset", "'Z/16'", "22B/14"]),
        (lambda: preset("B/x16"), ["'B/x16'", "patch size"]),
        (lambda: preset("B/16", image_size=225), ["image size 225", "patch size 16", "224"]),
        (lambda: ModelConfig(width=30, num_heads=4), ["width 30", "num_heads 4"]),
        (lambda: ModelConfig(mlp_dim=250, num_heads=4), ["mlp_dim 250", "num_heads 4", "sequential"]),
        (lambda: ModelConfig(width=66, num_heads=2, mlp_dim=264, posemb="sincos2d"),
         ["sincos2d", "divisible by 4", "66"]),
        (lambda: ModelConfig(block="serial"), ["block='serial'", "parallel", "sequential"]),
        (lambda: ModelConfig(norm="batch"), ["norm='batch'", "rms", "layer"]),
        (lambda: ModelConfig(head="cls"), ["head='cls'", "map", "gap"]),
        (lambda: ModelConfig(posemb="rope"), ["posemb='rope'", "sincos2d"]),
        (lambda: ModelConfig(qk_norm_type="l2"), ["qk_norm_type='l2'"]),
        (lambda: ModelConfig(dtype_mm="int8"), ["dtype_mm='int8'", "bfloat16"]),
        (lambda: ModelConfig(depth=0), ["depth must be positive", "0"]),
        (lambda: ModelConfig(num_heads=0), ["num_heads must be positive"]),
        (lambda: ModelConfig(num_classes=-1), ["num_classes", "-1"]),
    ],
)
def test_invalid_configs_name_the_cause(make, fragments):
    with pytest.raises(ConfigError) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_mlp_not_divisible_by_heads_is_fine_for_sequential():
    cfg = ModelConfig(mlp_dim=250, num_heads=4, block="sequential")
    assert cfg.mlp_dim == 250


def test_replace_revalidates():
    cfg = ModelConfig()
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        cfg.replace(width=65)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().width = 8  # type: ignore[misc]


def test_json_round_trip():
    cfg = preset("S/16", block="sequential", head="gap", norm="layer", qk_norm_type="rms",
                 norm_bias=True, num_classes=7, dtype_mm="float32", scan=False, remat="none",
                 head_bias_init=-10.0)
    text = cfg.to_json()
    assert json.loads(text)["head"] == "gap"
    assert ModelConfig.from_json(text) == cfg
    assert ModelConfig.from_json(ModelConfig().to_json()) == ModelConfig()


def test_unknown_field_is_named():
    d = json.loads(ModelConfig().to_json())
    d["hidden_size"] = 12
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="bogus"):
        preset("B/16", bogus=1)


def test_derived_sizes():
    cfg = preset("B/16")
    assert (cfg.head_dim, cfg.grid_size, cfg.num_patches, cfg.mlp_per_head) == (64, 14, 196, 256)
    assert cfg.qk_norm_kind == "rms"
    assert cfg.replace(qk_norm_type="layer").qk_norm_kind == "layer"
    assert cfg.replace(norm="layer").qk_norm_kind == "layer"


@pytest.mark.parametrize("changes, fragment", [
    (dict(head="token", class_token=False), "pools the class token"),
    (dict(class_posemb=True), "class_posemb=True gives the prefix tokens"),
    (dict(layer_scale=True), "use block='sequential'"),
    (dict(fc_norm=True, head="none"), "fc_norm normalises the pooled"),
    (dict(block="sequential", collective_matmul=True), "the sequential block has none"),
    (dict(num_registers=-1), "num_registers must be >= 0"),
    (dict(act="relu"), "act='relu' is not one of"),
])
def test_other_vit_switches_are_validated(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**changes)
