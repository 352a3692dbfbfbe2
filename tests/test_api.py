"""The Python API (api.py): save/load round trips, resolution changes, timm import/export, and
weights that belong to another config."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vit22b.api import export_timm, import_timm, load_model
from vit22b.config import ConfigError, ModelConfig
from vit22b.model import abstract_model, init_model, split_params
from vit22b.weights import WeightsError, flatten, save_model

GOLDEN = Path(__file__).parent / "data" / "timm" / "tiny_reference.safetensors"


def run(model, images, forward):
    """Logits and pre-logits of an nnx model, through the jitted functional forward pass."""
    _, params = split_params(model)
    logits, out = forward(model.cfg)(params, images)
    return np.asarray(logits), np.asarray(out["pre_logits"])


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN))


@pytest.fixture
def saved(tmp_path, tiny_cfg, random_params):
    """A model directory holding random (all nonzero) params of the tiny config."""
    params = random_params(tiny_cfg, seed=7)
    save_model(tmp_path / "model", params, tiny_cfg)
    return tmp_path / "model", params


def check_round_trip(directory, params, cfg, images, forward):
    loaded = load_model(directory)
    assert loaded.cfg == cfg
    _, loaded_params = split_params(loaded)
    flat, flat_loaded = flatten(params), flatten(loaded_params)
    assert flat.keys() == flat_loaded.keys()
    for name, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat_loaded[name]), np.asarray(value), err_msg=name)
    run_cfg = forward(cfg)
    logits, out = run_cfg(params, images)
    logits2, out2 = run_cfg(loaded_params, images)
    np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(out2["pre_logits"]), np.asarray(out["pre_logits"]))
    assert np.ptp(np.asarray(logits), axis=-1).min() > 1e-3  # the classifier is not trivial


def test_save_load_round_trip(saved, tiny_cfg, images, forward, tmp_path):
    directory, params = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    check_round_trip(directory, params, tiny_cfg, images, forward)
    # The file alone is self-describing (config in its metadata), without config.json beside it.
    alone = tmp_path / "alone.safetensors"
    shutil.copy(directory / "model.safetensors", alone)
    assert load_model(alone).cfg == tiny_cfg


@pytest.mark.slow  # the real initialiser compiles one random kernel per shape: seconds on CPU
def test_init_model_save_load_round_trip(tmp_path, tiny_cfg, images, forward):
    _, params = split_params(init_model(tiny_cfg, seed=3))
    # The initialiser zeroes the classifier (big_vision), which would hide the body from the
    # logits: give it values so that the logits depend on every parameter.
    params["head_kernel"] = jnp.asarray(
        np.random.default_rng(0).standard_normal(params["head_kernel"].shape), jnp.float32)
    path = save_model(tmp_path / "m", params, tiny_cfg)
    assert path == tmp_path / "m" / "model.safetensors"
    check_round_trip(tmp_path / "m", params, tiny_cfg, images, forward)


def test_load_model_overrides_config(saved, tiny_cfg):
    directory, _ = saved
    model = load_model(directory, dtype_mm="bfloat16")
    assert model.cfg == tiny_cfg.replace(dtype_mm="bfloat16")


def test_load_at_bigger_resolution_resamples_posemb(saved, tiny_cfg, forward):
    directory, params = saved
    assert tiny_cfg.grid_size == 4
    model = load_model(directory, image_size=32)
    assert model.cfg == tiny_cfg.replace(image_size=32)
    new = flatten(split_params(model)[1])
    old = {k: np.asarray(v) for k, v in flatten(params).items()}
    pe_old = old["pos_embedding"].reshape(4, 4, -1)
    pe_new = np.asarray(new["pos_embedding"])
    assert pe_new.shape == (1, 64, tiny_cfg.width)
    pe_new = pe_new.reshape(8, 8, -1)
    # big_vision's bilinear resampling maps the corner patches onto each other...
    for (i, j), (k, m) in [((0, 0), (0, 0)), ((0, 3), (0, 7)), ((3, 0), (7, 0)), ((3, 3), (7, 7))]:
        np.testing.assert_allclose(pe_new[k, m], pe_old[i, j], rtol=1e-5, atol=1e-6)
    # ...and interpolates in between: within the range of the old values, per channel.
    assert np.all(pe_new >= pe_old.min(axis=(0, 1)) - 1e-5)
    assert np.all(pe_new <= pe_old.max(axis=(0, 1)) + 1e-5)
    assert not np.allclose(pe_new[1:3, 1:3], pe_old[1:3, 1:3])
    # Everything else is untouched.
    for name, value in old.items():
        if name != "pos_embedding":
            np.testing.assert_array_equal(np.asarray(new[name]), value, err_msg=name)

    images = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    logits, _ = run(model, images, forward)
    assert logits.shape == (2, tiny_cfg.num_classes) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
        model(np.zeros((1, 16, 16, 3), np.float32))


def test_load_at_size_not_divisible_by_patch(saved):
    with pytest.raises(ConfigError, match="not divisible by patch size 4"):
        load_model(saved[0], image_size=30)


@pytest.mark.parametrize("changes", [dict(depth=2), dict(width=64, mlp_dim=256, num_heads=4)])
def test_weights_of_another_shape_name_the_first_offending_tensor(saved, tiny_cfg, changes):
    directory, params = saved
    other = tiny_cfg.replace(**changes)
    file_shapes = {k: np.shape(v) for k, v in flatten(params).items()}
    want = flatten(split_params(abstract_model(other))[1])
    first = next(name for name, leaf in want.items() if tuple(leaf.shape) != file_shapes[name])
    with pytest.raises(WeightsError, match=f"tensor '{first}' has shape") as info:
        load_model(directory, **changes)
    assert str(file_shapes[first]) in str(info.value)
    assert str(tuple(want[first].shape)) in str(info.value)


@pytest.mark.parametrize("changes, fragment", [
    (dict(qkv_bias=True), "is missing from the file"),
    (dict(head="gap"), "is not in the model"),
    (dict(block="sequential"), "is missing from the file"),
])
def test_weights_of_another_structure_name_a_tensor(saved, changes, fragment):
    directory, params = saved
    with pytest.raises(WeightsError, match=fragment) as info:
        load_model(directory, **changes)
    message = str(info.value)
    in_file = set(flatten(params))
    cfg = ModelConfig.from_json((directory / "config.json").read_text()).replace(**changes)
    in_model = set(flatten(split_params(abstract_model(cfg))[1]))
    named = message.split("tensor '")[1].split("'")[0]
    assert named in (in_model - in_file) | (in_file - in_model)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(tmp_path)
    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    save_file({"patch_kernel": np.zeros((4, 4, 3, 32), np.float32)}, str(bare))
    with pytest.raises(WeightsError, match="no vit22b config"):
        load_model(bare)


def test_import_and_export_timm(tmp_path, golden, forward):
    state = {k.removeprefix("param/"): v for k, v in golden.items() if k.startswith("param/")}
    cfg = import_timm(GOLDEN, tmp_path / "imported", num_heads=4, norm="layer",
                      gelu_approximate=False)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.image_size, cfg.num_classes) == (64, 2, 4, 56, 10)
    assert (tmp_path / "imported" / "model.safetensors").exists()
    assert (tmp_path / "imported" / "config.json").exists()

    model = load_model(tmp_path / "imported", dtype_mm="float32")
    assert model.cfg == cfg.replace(dtype_mm="float32")
    logits, _ = run(model, golden["input_nhwc"], forward)
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=1e-5)
    # The nnx module is callable directly too (the documented API).
    direct = np.asarray(jax.jit(lambda x: model(x)[0])(golden["input_nhwc"]))
    np.testing.assert_allclose(direct, golden["logits"], rtol=0, atol=1e-5)

    dst = export_timm(tmp_path / "imported", tmp_path / "out" / "timm.safetensors")
    assert dst == tmp_path / "out" / "timm.safetensors"
    back = load_file(str(dst))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # A timm file carries no vit22b config.
    with pytest.raises(WeightsError, match="no vit22b config"):
        load_model(dst)


def test_import_timm_rejects_a_non_timm_file(saved, tmp_path):
    with pytest.raises(ConfigError, match="timm weights lack"):
        import_timm(saved[0] / "model.safetensors", tmp_path / "x", num_heads=2)
    assert not (tmp_path / "x").exists()


def test_documented_top_level_imports():
    from vit22b import export_timm, import_timm, init_model, load_model, preset, save_model  # noqa: F401
