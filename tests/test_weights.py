"""safetensors weights: round trip, shape/name checks, posemb resampling, bad files, crash safety."""

import ast
import inspect
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

import vit22b.weights as weights_module
from vit22b.model import abstract_model, split_params
from vit22b.posemb import resample_posemb
from vit22b.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WeightsError,
    fit_weights,
    flatten,
    read_weights,
    save_model,
    unflatten,
)


def expected_params(cfg):
    return split_params(abstract_model(cfg))[1]


def as_numpy_flat(params):
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def test_flatten_unflatten_round_trip():
    tree = {"a": 1, "b": {"c": 2, "d": {"e": 3}}}
    flat = flatten(tree)
    assert flat == {"a": 1, "b/c": 2, "b/d/e": 3}
    assert unflatten(flat) == tree


def test_save_and_read_round_trip(tmp_path, tiny_cfg, random_params):
    params = random_params(tiny_cfg)
    path = save_model(tmp_path / "run", params, tiny_cfg)
    assert path == tmp_path / "run" / WEIGHTS_FILE
    assert (tmp_path / "run" / CONFIG_FILE).exists()
    for location in (tmp_path / "run", path):  # a directory or the file itself
        flat, cfg = read_weights(location)
        assert cfg == tiny_cfg
        want = as_numpy_flat(params)
        assert set(flat) == set(want)
        for name, value in want.items():
            assert flat[name].dtype == np.float32
            np.testing.assert_array_equal(flat[name], value, err_msg=name)
    # the lone file is self-describing (config in metadata), without config.json beside it
    (tmp_path / "run" / CONFIG_FILE).unlink()
    assert read_weights(path)[1] == tiny_cfg
    # fit_weights turns them back into a params tree of the model's structure
    fitted = fit_weights(read_weights(path)[0], expected_params(tiny_cfg))
    for name, value in flatten(fitted).items():
        np.testing.assert_array_equal(value, want[name])


def test_config_json_used_when_metadata_absent(tmp_path, tiny_cfg, random_params):
    flat = as_numpy_flat(random_params(tiny_cfg))
    save_file(flat, str(tmp_path / WEIGHTS_FILE))
    assert read_weights(tmp_path)[1] is None
    (tmp_path / CONFIG_FILE).write_text(tiny_cfg.to_json())
    assert read_weights(tmp_path)[1] == tiny_cfg


def test_missing_location(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        read_weights(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        read_weights(tmp_path)  # a directory without model.safetensors


def test_missing_tensor_is_named(tiny_cfg, random_params):
    expected = expected_params(tiny_cfg)
    flat = as_numpy_flat(random_params(tiny_cfg))
    order = list(flatten(expected))
    first, later = order[1], order[-1]
    del flat[later], flat[first]
    with pytest.raises(WeightsError) as info:
        fit_weights(flat, expected)
    msg = str(info.value)
    assert repr(first) in msg and repr(later) not in msg  # the first offender, in model order
    assert "missing" in msg and "2 missing" in msg
    assert "config" in msg  # the fix: use the checkpoint's own config


def test_unexpected_tensor_is_named(tiny_cfg, random_params):
    flat = as_numpy_flat(random_params(tiny_cfg))
    flat["encoder/qkv_bias"] = np.zeros((1, 2, 48), np.float32)
    with pytest.raises(WeightsError, match=r"'encoder/qkv_bias' is not in the model.*config"):
        fit_weights(flat, expected_params(tiny_cfg))


def test_wrong_shape_is_named(tiny_cfg, random_params):
    flat = as_numpy_flat(random_params(tiny_cfg))
    flat["head_kernel"] = np.zeros((32, 7), np.float32)
    with pytest.raises(WeightsError) as info:
        fit_weights(flat, expected_params(tiny_cfg))
    msg = str(info.value)
    assert "'head_kernel'" in msg and "(32, 7)" in msg and "(32, 10)" in msg
    assert "skip" in msg and "config" in msg


def test_skip_keeps_expected_values(tiny_cfg, random_params):
    """Fine-tuning to new classes: the head is taken from the model, not the file."""
    flat = as_numpy_flat(random_params(tiny_cfg))
    flat["head_kernel"] = np.zeros((32, 7), np.float32)
    del flat["head_bias"]
    fresh = as_numpy_flat(random_params(tiny_cfg, seed=9))
    out = flatten(fit_weights(flat, unflatten(fresh), skip=("head_kernel", "head_bias")))
    np.testing.assert_array_equal(out["head_kernel"], fresh["head_kernel"])
    np.testing.assert_array_equal(out["head_bias"], fresh["head_bias"])
    np.testing.assert_array_equal(out["patch_kernel"], flat["patch_kernel"])


def test_posemb_resampled_to_new_image_size(tmp_path, tiny_cfg, random_params, forward):
    params16 = random_params(tiny_cfg)
    save_model(tmp_path, params16, tiny_cfg)
    flat, saved_cfg = read_weights(tmp_path)
    cfg32 = saved_cfg.replace(image_size=32)  # grid 4 -> 8
    loaded = fit_weights(flat, expected_params(cfg32))
    pe = np.asarray(params16["pos_embedding"])
    assert loaded["pos_embedding"].shape == (1, 64, 32)
    np.testing.assert_allclose(loaded["pos_embedding"], resample_posemb(pe, 8, "bv_linear"))
    corners = loaded["pos_embedding"][0].reshape(8, 8, 32)[[0, 0, 7, 7], [0, 7, 0, 7]]
    np.testing.assert_allclose(corners, pe[0].reshape(4, 4, 32)[[0, 0, 3, 3], [0, 3, 0, 3]], atol=1e-6)
    cubic = fit_weights(flat, expected_params(cfg32), resample="cubic")
    assert not np.allclose(cubic["pos_embedding"], loaded["pos_embedding"])
    for name, value in flatten(loaded).items():
        if name != "pos_embedding":
            np.testing.assert_array_equal(value, flat[name])
    logits, _ = forward(cfg32)(loaded, np.zeros((1, 32, 32, 3), np.float32))
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("content", [
    b"",
    b"\xff" * 64,
    b"not a safetensors file at all, just some text",
    pickle.dumps({"patch_kernel": [1.0, 2.0]}),
    np.arange(10, dtype=np.float32).tobytes(),
])
def test_garbage_file_raises_weights_error(tmp_path, content):
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weights(tmp_path)


def test_truncated_file_raises_weights_error(tmp_path, tiny_cfg, random_params):
    path = save_model(tmp_path, random_params(tiny_cfg), tiny_cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        read_weights(path)


def test_weights_module_never_unpickles():
    source = inspect.getsource(weights_module)
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib", "torch"}, imported
    assert "allow_pickle" not in source
    assert "np.load(" not in source and "numpy.load(" not in source


def test_crash_mid_save_keeps_previous_file(tmp_path, tiny_cfg, random_params, monkeypatch):
    old = random_params(tiny_cfg, seed=0)
    path = save_model(tmp_path, old, tiny_cfg)
    before = path.read_bytes()
    config_before = (tmp_path / CONFIG_FILE).read_text()

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(weights_module, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_model(tmp_path, random_params(tiny_cfg, seed=1), tiny_cfg.replace(head_bias_init=-10.0))
    assert path.read_bytes() == before
    assert (tmp_path / CONFIG_FILE).read_text() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp left
    flat, cfg = read_weights(tmp_path)
    assert cfg == tiny_cfg
    for name, value in as_numpy_flat(old).items():
        np.testing.assert_array_equal(flat[name], value)


@pytest.mark.parametrize("conv_stem_channels", [0, 6])
def test_channel_adaptation_equals_gray_replicated_to_rgb(tmp_path, conv_stem_channels):
    """An RGB checkpoint on 1-channel data (timm's adapt_input_conv rule) computes exactly what the
    RGB model computes on the gray image replicated to three channels; and 1 -> 3 is the gray model
    on the channel mean. With a conv stem, its kernel is the one adapted (it sees the pixels)."""
    import jax

    from vit22b.api import load_model
    from vit22b.config import preset
    from vit22b.model import init_model, split_params
    from vit22b.weights import adapt_input_channels, save_model

    rgb_cfg = preset("mu/4", image_size=8, in_channels=3, num_classes=5, dtype_mm="float32",
                     conv_stem_channels=conv_stem_channels)
    _, params = split_params(init_model(rgb_cfg, seed=1))
    save_model(tmp_path / "rgb", jax.device_get(params), rgb_cfg)
    gray = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    as_rgb = load_model(tmp_path / "rgb")(np.repeat(gray, 3, axis=-1))[0]
    adapted = load_model(tmp_path / "rgb", in_channels=1)(gray)[0]
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(as_rgb), rtol=1e-5, atol=1e-5)

    kernel = np.random.default_rng(1).standard_normal((4, 4, 1, 6)).astype(np.float32)
    colour = np.random.default_rng(2).standard_normal((4, 4, 3)).astype(np.float32)
    wide = adapt_input_channels(kernel, 3)
    np.testing.assert_allclose(np.einsum("hwc,hwcd->d", colour, wide),
                               np.einsum("hw,hwd->d", colour.mean(-1), kernel[:, :, 0]), rtol=1e-5)
    with pytest.raises(WeightsError, match="only 1 <-> C"):
        adapt_input_channels(np.zeros((4, 4, 3, 6), np.float32), 4)
