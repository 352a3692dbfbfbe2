"""vit22b.features: named intermediates by shape, padding masks, unknown names."""

import numpy as np
import pytest

from vit22b.api import model_from_params
from vit22b.data import load_digits_dataset
from vit22b.features import dataset_features, extract, feature_fn


@pytest.fixture(scope="module")
def model(random_params):
    from vit22b.config import preset

    cfg = preset("mu/4", image_size=8, in_channels=1, num_classes=10, dtype_mm="float32", depth=2)
    return model_from_params(cfg, random_params(cfg))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)


@pytest.mark.parametrize(("name", "layers", "shape"), [
    ("pre_logits", (), (3, 32)), ("encoded", (), (3, 4, 32)), ("stem", (), (3, 4, 32)),
    ("block_0", (0,), (3, 4, 32)), ("block_1", (1,), (3, 4, 32)), ("logits", (), (3, 10))])
def test_feature_shapes(model, name, layers, shape):
    assert feature_fn(model, name, layers)(_images(3)).shape == shape


def test_block_features_differ_and_last_block_precedes_final_norm(model):
    x = _images(2)
    b0 = np.asarray(feature_fn(model, "block_0", (0,))(x))
    b1 = np.asarray(feature_fn(model, "block_1", (1,))(x))
    enc = np.asarray(feature_fn(model, "encoded")(x))
    assert not np.allclose(b0, b1)
    assert not np.allclose(b1, enc)  # encoded is after the final norm
    rms = np.sqrt((b1 ** 2).mean(-1, keepdims=True) + model.cfg.norm_eps)
    np.testing.assert_allclose(enc, b1 / rms * np.asarray(model.encoder_norm_scale[...]), rtol=1e-4,
                               atol=1e-5)


def test_extract_drops_padding_by_mask(model):
    x = _images(4)
    batches = [{"image": x, "label": np.array([0, 1, 2, 3]), "mask": np.array([1, 1, 0, 1], bool)},
               {"image": x, "label": np.array([4, 5, 6, 7])}]  # no mask: all kept
    feats, labels = extract(model, batches)
    np.testing.assert_array_equal(labels, [0, 1, 3, 4, 5, 6, 7])
    full = np.asarray(feature_fn(model, "pre_logits")(x))
    np.testing.assert_allclose(feats[:3], full[[0, 1, 3]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[3:], full, rtol=1e-5, atol=1e-6)


def test_dataset_features_cover_split_in_order(model):
    data = load_digits_dataset(8)
    feats, labels = dataset_features(model, data, split="val", batch_size=100)  # 360: last batch padded
    assert feats.shape == (data.val_size, 32)
    np.testing.assert_array_equal(labels, data.val.labels)
    first = next(data.eval_batches(100, split="val"))["image"][:5]
    np.testing.assert_allclose(feats[:5], np.asarray(feature_fn(model, "pre_logits")(first)),
                               rtol=1e-5, atol=1e-6)


def test_unknown_feature_names_the_available_ones(model):
    with pytest.raises(KeyError) as e:
        feature_fn(model, "pooled")(_images(1))
    msg = str(e.value)
    assert "pooled" in msg and "pre_logits" in msg and "encoded" in msg and "return_layers" in msg
    with pytest.raises(KeyError, match="block_1"):  # a block not asked for is not produced
        feature_fn(model, "block_1", (0,))(_images(1))
