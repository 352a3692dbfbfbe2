"""`train_config_for`: `vit22b train`'s policy from Python (recipes.py), against numbers fixed in
advance: the paper's 10k/177k warm-up and 30k/177k cool-down, the digits recipe, the sigmoid head
bias at the label prior."""

from __future__ import annotations

import math

import pytest

from vit22b.config import ConfigError
from vit22b.data import load_digits_dataset
from vit22b.recipes import train_config_for


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(16)


def test_digits_defaults_are_the_cli_defaults(digits):
    cfg = train_config_for(digits, "digits")
    assert (cfg.workdir, cfg.steps, cfg.batch_size, cfg.loss) == ("workdirs/digits", 1500, 128, "sigmoid")
    assert cfg.augment == "crop_flip"  # translations (digits are never flipped: the data set says so)
    o = cfg.optim
    assert (o.optimizer, o.learning_rate, o.schedule) == ("adafactor", 3e-3, "rsqrt")
    assert (o.warmup_steps, o.cooldown_steps, o.timescale) == (85, 254, 85)  # 1500 x 10/177, 30/177
    assert (o.weight_decay, o.head_wd_mult) == (0.03, 100.0)
    m = cfg.model
    assert (m.width, m.depth, m.patch_size, m.image_size, m.num_classes) == (64, 4, 4, 16, 10)
    assert m.head_bias_init == pytest.approx(-math.log(9))  # sigmoid: start at the label prior


def test_overrides_and_run_length_scaling(digits):
    cfg = train_config_for(digits, "digits", preset_name="mu/4", steps=354, loss="softmax",
                           model={"remat": "none"}, optim={"learning_rate": 1e-2}, batch_size=64,
                           workdir="w", label_smoothing=None)
    assert (cfg.steps, cfg.batch_size, cfg.workdir, cfg.loss) == (354, 64, "w", "softmax")
    assert (cfg.optim.warmup_steps, cfg.optim.cooldown_steps, cfg.optim.learning_rate) == (20, 60, 1e-2)
    assert (cfg.model.width, cfg.model.remat, cfg.model.head_bias_init) == (32, "none", 0.0)
    assert cfg.label_smoothing == 0.0  # None: the recipe's
    assert train_config_for(digits, "digits", augment="flip").augment == "flip"
    assert train_config_for(digits, "digits", augment=False).augment == "none"  # the old bool form
    with pytest.raises(ValueError, match="choose one of crop_flip, flip, none"):
        train_config_for(digits, "digits", augment="cutmix")


def test_init_and_preset_together_is_refused(digits):
    with pytest.raises(ConfigError, match="drop --preset"):
        train_config_for(digits, "digits", preset_name="mu/4", init_from="somewhere")


def test_flag_help_shows_each_data_sets_default():
    """`vit22b train --help` is generated from the recipes: what an unset flag means per data set."""
    from vit22b.recipes import effective_default

    assert effective_default("learning_rate") == "digits: 0.003; fashion-mnist: 0.002; else: 0.001"
    assert effective_default("batch_size") == "all data: 128"
    assert effective_default("augment") == "fashion-mnist: none; else: crop_flip"
    assert effective_default("preset") == "digits: nano/4; fashion-mnist: nano/7; else: Ti/16"


def test_platform_matmul_dtype_reads_the_cpu_flags(tmp_path):
    """bfloat16 only where the CPU multiplies it natively (AVX-512 BF16 or AMX), else float32."""
    from vit22b.recipes import platform_matmul_dtype

    info = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 fma", "float32"), ("avx2 avx512f avx512bw", "float32"),
                            ("avx2 avx512f avx512_bf16", "bfloat16"), ("avx2 amx_bf16 amx_tile", "bfloat16")):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert platform_matmul_dtype(info) == expected, flags
    assert platform_matmul_dtype(tmp_path / "absent") == "float32"


def test_fashion_recipe_takes_the_platform_matmul_dtype(monkeypatch):
    """The Fashion-MNIST recipe's matmuls follow the platform; a --dtype-mm flag still wins."""
    from types import SimpleNamespace

    from vit22b import recipes

    data = SimpleNamespace(image_size=28, in_channels=1, num_classes=10)
    recipe = recipes.recipe_for("fashion-mnist")
    for platform in ("bfloat16", "float32"):
        monkeypatch.setattr(recipes, "platform_matmul_dtype", lambda p=platform: p)
        assert recipes.model_config_for(recipe, data).dtype_mm == platform
        assert recipes.model_config_for(recipe, data, dtype_mm="float16").dtype_mm == "float16"
