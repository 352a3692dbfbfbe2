"""Streamed image files: worker-count determinism, skip-and-count of undecodable files, 16-bit PNGs."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit22b.folders import load_image_folder
from vit22b.image_files import eval_image, open_rgb


def make_folder(root: Path, per_class: int = 8, size: int = 12) -> Path:
    rng = np.random.default_rng(1)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.integers(0, 60, (size, size, 3)) + 150 * c, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def corrupt_past_header(path: Path) -> None:
    """A PNG whose header reads (so the scan keeps it) but whose pixel data is garbage."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 24] = b"\xff" * 24
    path.write_bytes(bytes(data))


def take(it, n):
    return list(itertools.islice(it, n))


def test_batches_do_not_depend_on_worker_count(tmp_path):
    ds = load_image_folder(make_folder(tmp_path / "d"), 8, val_fraction=0.25)
    runs = {w: take(ds.train_batches(4, seed=5, start_step=2, workers=w), 4) for w in (0, 2)}
    for a, b in zip(runs[0], runs[2], strict=True):
        for key in ("image", "label", "skipped_index"):
            np.testing.assert_array_equal(a[key], b[key])
    # a resume at step 4 sees exactly the uninterrupted run's batches 4 and 5
    resumed = take(ds.train_batches(4, seed=5, start_step=4, workers=0), 2)
    for a, b in zip(resumed, runs[0][2:], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_undecodable_file_is_replaced_deterministically_and_reported(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3)
    bad = root / "a" / "1.png"
    corrupt_past_header(bad)
    with pytest.raises(OSError):
        open_rgb(str(bad))
    ds = load_image_folder(root, 8, val_fraction=0.01)  # nothing held out: round(0.01 * 3) = 0
    assert ds.skipped == 0 and str(bad) in ds.train.paths  # the header check keeps it
    bad_index = ds.train.paths.index(str(bad))
    batches = take(ds.train_batches(6, seed=0, workers=0), 3)  # 3 epochs of all 6 images
    for batch in batches:
        assert (batch["skipped_index"] >= 0).sum() == 1  # once per epoch, the bad file
        np.testing.assert_array_equal(batch["skipped_index"][batch["skipped_index"] >= 0], [bad_index])
        assert np.isfinite(batch["image"]).all()
    again = take(ds.train_batches(6, seed=0, workers=0), 3)
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # evaluation leaves it out through the mask
    eval_ds = load_image_folder(root, 8, val_path=root)
    masks = np.concatenate([b["mask"] for b in eval_ds.eval_batches(4)])[:6]
    assert masks.tolist() == [i != 1 for i in range(6)]


def test_training_counts_skipped_files_in_metrics_and_final(tmp_path):
    import json

    from vit22b.config import preset
    from vit22b.train import TrainConfig, train

    root = make_folder(tmp_path / "d", per_class=4)
    corrupt_past_header(root / "b" / "2.png")
    (root / "a" / "junk.png").write_bytes(b"not a png at all")  # fails the header check at load
    cfg = TrainConfig(model=preset("mu/4", image_size=8, num_classes=2), workdir=str(tmp_path / "w"),
                      steps=4, batch_size=8, progress=False, data_workers=0, checkpoint_every=100)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = load_image_folder(root, 8, val_fraction=0.01)
    result = train(cfg, ds)
    assert result["skipped_files"] == 2  # one at the header check, one at decode (counted once)
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-2]["data/skipped_files"] == 2 and "train/data_wait_ms" in lines[-2]
    assert json.loads((tmp_path / "w" / "final.json").read_text())["skipped_files"] == 2


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(16, dtype=np.uint16)[None, :] * 4369).repeat(16, 0)  # 0 .. 65535
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # PIL writes a 16-bit grayscale PNG
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(open_rgb(buf.getvalue()))
    expected = np.round(ramp / 257).astype(np.uint8)  # 65535 -> 255, independent of the code's scale
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], expected)
    assert eval_image(buf.getvalue(), 8).std() > 50  # not a solid white image


def test_one_class_folder_is_refused(tmp_path):
    from vit22b.data import DataError, load_dataset

    root = tmp_path / "d"
    (root / "only").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(root / "only" / f"{i}.png")
    with pytest.raises(DataError, match="single class.*at least two classes"):
        load_dataset(str(root), 8)
