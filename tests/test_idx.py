"""The IDX (MNIST-format) reader and the in-memory data sets built on it, on small files the tests write."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from vit22b.data import DataError, load_dataset
from vit22b.idx import FASHION_MNIST_DIR, IdxError, read_idx, read_idx_split, resolve_idx_source


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """The IDX layout written independently with struct: magic 0 0 type ndim, big-endian dims, data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    data = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dir(root: Path, n_train: int = 40, n_test: int = 20, size: int = 12, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 4).astype(np.uint8)
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        images[:, 0, 0] = labels * 50  # a pixel that says the label, to check pairing
        write_idx(root / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz)
    return root


def test_read_idx_gzipped_and_plain_match_the_written_arrays(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a)), a)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", a, gz=True)), a)
    wide = np.array([1, -2, 70000], dtype=">i4")
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "c", wide)), [1, -2, 70000])


def test_read_idx_split_pairs_images_with_labels(tmp_path):
    root = make_idx_dir(tmp_path / "d")
    images, labels = read_idx_split(root, "train")
    assert images.shape == (40, 12, 12, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels * 50)


@pytest.mark.parametrize("damage, match", [
    (lambda d: d[:-7], "declares shape"),  # truncated data
    (lambda d: b"\x01\x02" + d[2:], "not an IDX file"),  # bad magic
    (lambda d: d[:6], "truncated inside its header"),
    (lambda d: d[:4] + struct.pack(">I", 2**31) + d[8:], "declares shape"),  # shape bomb: nothing allocated
])
def test_read_idx_refuses_damaged_files(tmp_path, damage, match):
    path = write_idx(tmp_path / "x", np.zeros((4, 3, 3), np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IdxError, match=match):
        read_idx(path)


def test_idx_dataset_splits_and_holdout(tmp_path):
    root = make_idx_dir(tmp_path / "d")
    ds = load_dataset(f"idx:{root}", None)
    assert (ds.train_size, ds.val_size, ds.image_size, ds.in_channels, ds.num_classes) == (40, 20, 12, 1, 4)
    assert ds.flip  # clothes and most data sets may be mirrored; only digits refuse
    held = load_dataset(f"idx:{root}", None, holdout="train", val_fraction=0.25)
    # stratified: round(0.25 * 10) = 2 (round half to even) of each class's 10 images held out
    assert (held.train_size, held.val_size) == (32, 8)
    assert np.bincount(held.val.labels).tolist() == [2, 2, 2, 2]
    # the held-out images are training images, never test images
    train_images, _ = read_idx_split(root, "train")
    val_rows = {im.tobytes() for im in held.val.images}
    assert val_rows <= {im.tobytes() for im in train_images}
    resized = load_dataset(f"idx:{root}", 16)
    assert resized.train.images.shape == (40, 16, 16, 1)


def test_idx_errors_name_the_fix(tmp_path):
    with pytest.raises(IdxError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'nope'}", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdxError, match="has no train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path / 'empty'}", None)
    root = make_idx_dir(tmp_path / "d")
    with pytest.raises(DataError, match="drop --val-data"):
        load_dataset(f"idx:{root}", None, val_path=root)


def test_fashion_mnist_by_name(monkeypatch, tmp_path):
    if not FASHION_MNIST_DIR.is_dir():
        with pytest.raises(IdxError, match="apt-get install -y dataset-fashion-mnist"):
            resolve_idx_source("fashion-mnist")
        pytest.skip("the Debian package dataset-fashion-mnist is not installed: only the error is tested")
    ds = load_dataset("fashion-mnist", None)
    assert (ds.train_size, ds.val_size, ds.image_size) == (60_000, 10_000, 28)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert np.bincount(ds.val.labels).tolist() == [1000] * 10  # the data set's balanced test split


def test_one_class_data_is_refused(tmp_path):
    root = make_idx_dir(tmp_path / "d")
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(40, np.uint8), gz=True)
    with pytest.raises(DataError, match="single class.*at least two classes"):
        load_dataset(f"idx:{root}", None)
