"""timm's standard ViT family against goldens made by timm itself (tests/data/make_goldens.py)."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from vit22b.config import ConfigError
from vit22b.model import abstract_model, split_params
from vit22b.timm_convert import config_from_timm, flat_to_timm, timm_to_flat
from vit22b.timm_vit import overrides_from_timm_name
from vit22b.weights import flatten, unflatten

DATA = Path(__file__).parent / "data" / "timm_vit"
ATOL = 1e-5
# family -> what shapes cannot show (the goldens' 64-wide models have 4 heads of 16, not 64)
FLAGS = {
    "augreg": dict(num_heads=4),
    "gap_fcnorm": dict(num_heads=4),
    "siglip": dict(num_heads=4),
    "clip": dict(num_heads=4, norm_eps=1e-5, act="quick_gelu"),
    "dinov2_reg": dict(num_heads=4),
    "dinov2": dict(),  # qk_norm: the head count shows in q_norm's size
}
# what detection must find in each family
EXPECT = {
    "augreg": dict(head="token", class_token=True, class_posemb=True, qkv_bias=True, norm_bias=True),
    "gap_fcnorm": dict(head="gap", fc_norm=True, class_token=True, class_posemb=True),
    "siglip": dict(head="map", class_token=False, num_registers=0, map_bias=True),
    "clip": dict(head="token", pre_norm=True, patch_bias=False, class_posemb=True),
    "dinov2_reg": dict(head="token", layer_scale=True, num_registers=4, class_posemb=False,
                       num_classes=0, image_size=28, patch_size=7),
    "dinov2": dict(head="token", layer_scale=True, qk_norm=True, num_heads=4, class_posemb=True),
}


def golden(family: str) -> tuple[dict, dict]:
    g = load_file(str(DATA / f"{family}.safetensors"))
    return g, {k.removeprefix("param/"): v for k, v in g.items() if k.startswith("param/")}


@pytest.mark.parametrize("family", sorted(FLAGS))
def test_logits_match_timm(family, forward):
    g, state = golden(family)
    cfg = config_from_timm(state, dtype_mm="float32", **FLAGS[family])
    for field, value in EXPECT[family].items():
        assert getattr(cfg, field) == value, field
    assert cfg.block == "sequential" and cfg.norm == "layer"
    flat = timm_to_flat(state, cfg)
    _, want = split_params(abstract_model(cfg))
    assert {k: v.shape for k, v in flat.items()} == {k: tuple(v.shape) for k, v in flatten(want).items()}
    logits, out = forward(cfg, return_layers=(0,))(unflatten(flat), g["input_nhwc"])
    np.testing.assert_allclose(logits, g["logits"], rtol=0, atol=ATOL)
    assert out["encoded"].shape[1] == cfg.num_patches == out["block_0"].shape[1]  # patch tokens only
    back = flat_to_timm(flat, cfg)  # and back to timm, bit for bit
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_wrong_flag_moves_the_logits(forward):
    """The goldens can tell the MLP activations apart (QuickGELU, exact and tanh GELU)."""
    g, state = golden("clip")
    for wrong in (dict(act="gelu"), dict(act="gelu", gelu_approximate=True)):
        cfg = config_from_timm(state, dtype_mm="float32", **{**FLAGS["clip"], **wrong})
        logits, _ = forward(cfg)(unflatten(timm_to_flat(state, cfg)), g["input_nhwc"])
        assert np.abs(logits - g["logits"]).max() > 100 * ATOL, wrong


def test_head_count_default_and_contradiction():
    _, state = golden("augreg")
    assert config_from_timm(state).num_heads == 1  # width 64 / default head_dim 64
    assert config_from_timm(state, head_dim=16).num_heads == 4
    _, state = golden("dinov2")
    with pytest.raises(ConfigError, match="num_heads must be 4"):
        config_from_timm(state, num_heads=2)


def test_unused_tensors_are_refused():
    _, state = golden("augreg")
    cfg = config_from_timm(state, num_heads=4, qkv_bias=False)
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.qkv\.bias"):
        timm_to_flat(state, cfg)
    with pytest.raises(ConfigError, match="no square grid"):
        config_from_timm({**state, "pos_embed": state["pos_embed"][:, :-2]})


@pytest.mark.parametrize("name, expect", [
    ("vit_base_patch16_224.augreg_in21k", dict(num_heads=12, act="gelu", gelu_approximate=False)),
    ("deit_small_patch16_224", dict(num_heads=6)),
    ("vit_so400m_patch14_siglip_224.webli", dict(num_heads=16, head="map")),
    ("vit_large_patch14_clip_quickgelu_224.openai", dict(num_heads=16, act="quick_gelu", norm_eps=1e-5)),
    ("vit_base_patch16_clip_224.laion2b", dict(act="gelu", norm_eps=1e-5)),
    ("vit_small_patch14_reg4_dinov2.lvd142m", dict(num_heads=6, norm_eps=1e-6)),
    ("vit_medium_patch16_gap_256", dict(num_heads=8, head="gap")),
])
def test_timm_names(name, expect):
    got = overrides_from_timm_name(name)
    assert {k: got[k] for k in expect} == expect


def test_unknown_timm_name_is_a_config_error():
    with pytest.raises(ConfigError, match="--timm-model"):
        overrides_from_timm_name("resnet50.a1_in1k")


def test_import_by_timm_model_name_then_predict(tmp_path, capsys):
    """`vit22b import --timm-model NAME` takes eps and QuickGELU from the name (the flag overrides
    its head count: the golden is a 64-wide toy), and the model predicts timm's logits."""
    from vit22b.cli import main

    g, _ = golden("clip")
    out = tmp_path / "clip"
    assert main(["import", str(DATA / "clip.safetensors"), "--out", str(out), "--timm-model",
                 "vit_base_patch16_clip_quickgelu_224.openai", "--num-heads", "4"]) == 0
    assert "eps 1e-05, quick_gelu" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", g["input_nhwc"])
    assert main(["predict", "--checkpoint", str(out), "--input-npy", str(tmp_path / "x.npy"),
                 "--output-npy", str(tmp_path / "y.npy"), "--dtype-mm", "float32",
                 "--any-float-range"]) == 0  # the golden input is N(0, 1), as timm-normalised images
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), g["logits"], rtol=0, atol=ATOL)


def test_a_conv_stem_model_is_not_exported_to_timm(tiny_cfg):
    for cfg in (tiny_cfg.replace(conv_stem_channels=4),
                tiny_cfg.replace(conv_stem_channels=4, block="sequential")):
        flat = {k: np.zeros(v.shape, np.float32)
                for k, v in flatten(split_params(abstract_model(cfg))[1]).items()}
        with pytest.raises(ConfigError, match="has no conv stem"):
            flat_to_timm(flat, cfg)
