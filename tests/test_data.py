"""The data pipeline: splits, determinism, resume, multi-process shares, eval masks, bad data."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vit22b.data import DataError, ImageDataset, load_dataset, load_digits_dataset
from vit22b.folders import load_image_folder

COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 20)}


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits_dataset(16)


def make_folder(root: Path, per_class: int = 6, corrupt: bool = True) -> Path:
    """Three classes of small PNG/JPEG images coloured by class, in several modes and sizes."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (20, 28) if i % 2 else (30, 18)
            pixels = np.clip(np.array(colour) + rng.integers(-15, 16, (h, w, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels)
            if i == 1:
                im = im.convert("RGBA")
            elif i == 2:
                im = im.convert("P", palette=Image.Palette.ADAPTIVE)
            elif i == 3:
                im.save(root / name / f"{i}.JPEG", quality=95)  # upper-case extension
                continue
            im.save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")
    if corrupt:
        buf = root / "tmp.jpg"
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buf)
        data = buf.read_bytes()
        buf.unlink()
        (root / "red" / "truncated.jpg").write_bytes(data[: len(data) // 2])
        (root / "green" / "garbage.png").write_bytes(b"\x00definitely not a png" * 20)
    return root


@pytest.fixture()
def folder(tmp_path: Path) -> ImageDataset:
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        return load_image_folder(make_folder(tmp_path / "train"), 8, val_fraction=0.34, seed=0)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- digits


def test_digits_split_is_sklearns_test_part():
    raw = load_digits()
    x_tr, x_val, y_tr, y_val = train_test_split(
        raw.images, raw.target, test_size=0.2, stratify=raw.target, random_state=0)
    ds = load_digits_dataset(8)  # no resampling at 8x8: pixels are the raw values scaled to 0..255
    assert (ds.train_size, ds.val_size) == (1437, 360)
    np.testing.assert_array_equal(ds.val.labels, y_val)
    np.testing.assert_array_equal(ds.train.labels, y_tr)
    np.testing.assert_array_equal(ds.val.images[..., 0], np.round(x_val * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(ds.train.images[..., 0], np.round(x_tr * 255 / 16).astype(np.uint8))
    # eval at 8x8 gives back the raw images, normalised to [-1, 1]
    batch = next(ds.eval_batches(360))
    np.testing.assert_allclose(batch["image"][..., 0], x_val / 8 - 1, atol=0.5 / 127.5 + 1e-6)


def test_digits_metadata_and_batch_format(digits):
    assert digits.name == "digits"
    assert digits.class_names == tuple("0123456789") and digits.num_classes == 10
    assert (digits.in_channels, digits.image_size, digits.skipped) == (1, 16, 0)
    assert digits.train.images.shape == (1437, 16, 16, 1) and digits.val.images.shape == (360, 16, 16, 1)
    for batch in take(digits.train_batches(128, seed=3), 3):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (128, 16, 16, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["image"].min() == -1 and batch["image"].max() > 0.9  # full range is used
        assert set(batch["label"]) <= set(range(10))


def test_digits_upsampling_is_smooth(digits):
    # bilinear 8 -> 16: the upsampled image averaged back to 8x8 stays close to the original
    raw = load_digits_dataset(8).train.images[..., 0].astype(np.float32)
    down = digits.train.images[..., 0].astype(np.float32).reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.abs(down - raw).mean() < 20


def test_digits_determinism_and_seed(digits):
    a = take(digits.train_batches(64, seed=1), 4)
    b = take(digits.train_batches(64, seed=1), 4)
    c = take(digits.train_batches(64, seed=2), 4)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_digits_resume_across_epochs(digits):
    full = take(digits.train_batches(128, seed=5), 30)  # ~11 steps per epoch: crosses 2 boundaries
    for s in (1, 11, 17, 25):
        assert_batches_equal(take(digits.train_batches(128, seed=5, start_step=s), 5), full[s:s + 5])


def test_digits_epochs_are_permutations_reshuffled(digits):
    # 1437 = 3 * 479: without augmentation, steps 0-2 are epoch 0 and steps 3-5 epoch 1
    flat = digits.train.images.reshape(1437, -1)
    lookup = {row.tobytes(): i for i, row in enumerate(flat)}
    assert len(lookup) == 1437  # no duplicate digits, so each image names its example
    batches = take(digits.train_batches(479, seed=0, augment=False), 6)
    orders = []
    for epoch in (0, 1):
        images = np.concatenate([b["image"] for b in batches[3 * epoch:3 * epoch + 3]])
        u8 = np.round((images + 1) * 127.5).astype(np.uint8).reshape(1437, -1)
        order = [lookup[row.tobytes()] for row in u8]
        labels = np.concatenate([b["label"] for b in batches[3 * epoch:3 * epoch + 3]])
        np.testing.assert_array_equal(labels, digits.train.labels[order])
        assert sorted(order) == list(range(1437))
        orders.append(order)
    assert orders[0] != orders[1] and orders[0] != list(range(1437))


def test_digits_augmentation_is_a_translation_without_flip(digits):
    plain = next(digits.train_batches(128, seed=4, augment=False))
    aug = next(digits.train_batches(128, seed=4))
    np.testing.assert_array_equal(plain["label"], aug["label"])  # same examples, same order
    assert not np.array_equal(plain["image"], aug["image"])
    pad, shifts = 2, []
    padded = np.pad(plain["image"][..., 0], ((0, 0), (pad, pad), (pad, pad)), constant_values=-1)
    for i in range(128):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(padded[i, dy:dy + 16, dx:dx + 16], aug["image"][i, ..., 0])]
        assert found, f"augmented example {i} is not a translation of the original"
        shifts.append(found[0])
    assert len(set(shifts)) > 5  # offsets vary across the batch


def test_flip_augmentation_mirrors_some_examples_and_nothing_else(digits):
    clothes = dataclasses.replace(digits, flip=True)  # a data set whose classes survive a mirror
    plain = next(clothes.train_batches(128, seed=4, augment="none"))
    flipped = next(clothes.train_batches(128, seed=4, augment="flip"))
    np.testing.assert_array_equal(plain["label"], flipped["label"])
    mirrored = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
                for p, f in zip(plain["image"], flipped["image"], strict=True)]
    same = [np.array_equal(f, p) for p, f in zip(plain["image"], flipped["image"], strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 40 < sum(mirrored) < 88  # about half of 128, by a fair coin per example
    # digits may not be mirrored: "flip" on them is the identity, "none" the plain images
    np.testing.assert_array_equal(next(digits.train_batches(128, seed=4, augment="flip"))["image"],
                                  plain["image"])
    # True/False are "crop_flip"/"none"
    assert_batches_equal(take(digits.train_batches(64, seed=2, augment=True), 2),
                         take(digits.train_batches(64, seed=2, augment="crop_flip"), 2))
    with pytest.raises(DataError, match="crop_flip, flip, none"):
        next(digits.train_batches(8, augment="mixup"))


def test_digits_multiprocess_shares_partition_the_global_batch(digits):
    clothes = dataclasses.replace(digits, flip=True)  # flips drawn per global batch too
    for augment in ("crop_flip", "flip", "none"):
        whole = take(clothes.train_batches(96, seed=7, augment=augment, start_step=10), 3)
        shares = [take(clothes.train_batches(32, seed=7, augment=augment, start_step=10,
                                            process_index=i, process_count=3), 3) for i in range(3)]
        for s in range(3):
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([sh[s][key] for sh in shares]), whole[s][key])
    assert not np.array_equal(shares[0][0]["image"], shares[1][0]["image"])


def test_digits_eval_covers_val_once(digits):
    batches = list(digits.eval_batches(100))
    assert len(batches) == 4
    for b in batches:
        assert set(b) == {"image", "label", "mask"} and b["image"].shape == (100, 16, 16, 1)
        assert b["mask"].dtype == bool
    assert batches[-1]["mask"].sum() == 60 and not batches[-1]["mask"][60:].any()
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])[mask]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, digits.val.labels)
    np.testing.assert_allclose(images, digits.val.images / 127.5 - 1, atol=1e-6)


# ---------------------------------------------------------------- folders


def test_folder_loading_skips_and_counts_corrupt_files(folder):
    assert folder.class_names == ("blue", "green", "red") and folder.num_classes == 3
    assert folder.in_channels == 3 and folder.image_size == 8
    assert folder.skipped == 2
    assert folder.train_size + folder.val_size == 18
    paths = folder.train.paths + folder.val.paths
    assert not any("truncated" in p or "garbage" in p or p.endswith(".txt") for p in paths)
    assert any(p.endswith(".JPEG") for p in paths)
    # stratified: round(0.34 * 6) = 2 of each class held out, the rest trains
    assert np.bincount(folder.val.labels).tolist() == [2, 2, 2]
    assert not set(folder.train.paths) & set(folder.val.paths)


def test_folder_split_is_deterministic_per_seed(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10, corrupt=False)
    a = load_image_folder(root, 8, seed=1)
    b = load_image_folder(root, 8, seed=1)
    c = load_image_folder(root, 8, seed=2)
    assert a.val.paths == b.val.paths and a.train.paths == b.train.paths
    assert a.val.paths != c.val.paths


def test_folder_batches_format_and_colours(folder):
    batch = next(folder.train_batches(6, workers=0, seed=0))
    assert batch["image"].shape == (6, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (6,)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    for b in (batch, next(folder.eval_batches(4))):
        # every mode (RGB/RGBA/palette/JPEG) decodes to RGB with its class colour dominant
        dominant = b["image"].mean(axis=(1, 2)).argmax(axis=1)  # channel index: 0=R, 1=G, 2=B
        expected = np.array([2, 1, 0])[b["label"]]  # blue, green, red
        np.testing.assert_array_equal(dominant, expected)


def test_folder_determinism_resume_and_augmentation(folder):
    full = take(folder.train_batches(4, workers=0, seed=3), 8)  # 12 train images: an epoch is 3 steps
    assert_batches_equal(take(folder.train_batches(4, workers=0, seed=3), 8), full)
    assert_batches_equal(take(folder.train_batches(4, workers=0, seed=3, start_step=5), 3), full[5:])
    other = next(folder.train_batches(4, workers=0, seed=4))
    assert not np.array_equal(other["image"], full[0]["image"])
    # augmentation (random crops and flips) changes the pixels of the same examples
    plain = next(folder.train_batches(4, workers=0, seed=3, augment=False))
    np.testing.assert_array_equal(plain["label"], full[0]["label"])
    assert not np.allclose(plain["image"], full[0]["image"])
    # "flip": the plain (central-crop) image or its mirror, nothing else
    flips = take(folder.train_batches(4, workers=0, seed=3, augment="flip"), 3)
    plains = take(folder.train_batches(4, workers=0, seed=3, augment="none"), 3)
    kinds = [("same" if np.array_equal(f, p) else "mirror" if np.array_equal(f, p[:, ::-1]) else "other")
             for fb, pb in zip(flips, plains, strict=True)
             for f, p in zip(fb["image"], pb["image"], strict=True)]
    assert "other" not in kinds and "mirror" in kinds and "same" in kinds


def test_folder_multiprocess_shares(folder):
    whole = take(folder.train_batches(6, workers=0, seed=2, start_step=3), 2)
    shares = [take(folder.train_batches(3, workers=0, seed=2, start_step=3, process_index=i,
                                        process_count=2), 2)
              for i in range(2)]
    for s in range(2):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([sh[s][key] for sh in shares]), whole[s][key])


def test_folder_eval_covers_val_once(folder):
    batches = list(folder.eval_batches(4))  # 6 val images -> 4 + 2 (padded)
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, folder.val.labels)
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    np.testing.assert_array_equal(batches[-1]["image"][2:], -1.0)  # padding is blank


def test_val_folder(tmp_path):
    train = make_folder(tmp_path / "train", corrupt=False)
    val = make_folder(tmp_path / "val", per_class=2)
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = load_dataset(str(train), 8, val_path=val)
    assert (ds.train_size, ds.val_size, ds.skipped) == (18, 6, 2)
    assert all(p.startswith(str(val)) for p in ds.val.paths)


def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits", 8).name == "digits"
    with pytest.raises(DataError, match="fixed val split"):
        load_dataset("digits", 8, val_path=tmp_path)


# ---------------------------------------------------------------- errors


def test_error_missing_and_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*pass an existing folder"):
        load_image_folder(tmp_path / "nope", 8)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_image_folder(tmp_path / "file.png", 8)


def test_error_no_class_folders(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path, 8)


def test_error_class_without_images(tmp_path):
    root = make_folder(tmp_path / "d", corrupt=False)
    (root / "zebra").mkdir()
    (root / "zebra" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="zebra.*holds no image files"):
        load_image_folder(root, 8)


def test_error_nothing_readable(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 2 image files.*all 2 skipped"):
        load_image_folder(tmp_path, 8)


def test_error_class_with_only_corrupt_files(tmp_path):
    root = make_folder(tmp_path / "d", corrupt=False)
    (root / "zebra").mkdir()
    (root / "zebra" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="'zebra'.*no readable image"):
        load_image_folder(root, 8)


def test_error_val_class_names_differ(tmp_path):
    train = make_folder(tmp_path / "train", corrupt=False)
    val = make_folder(tmp_path / "val", per_class=1, corrupt=False)
    (val / "red").rename(val / "rose")
    with pytest.raises(DataError, match="rose.*same class"):
        load_image_folder(train, 8, val_path=val)


def test_error_batch_size(digits, folder):
    for bad in (0, -1, 1438):
        with pytest.raises(DataError, match="batch size between 1 and 1437"):
            next(digits.train_batches(bad))
    with pytest.raises(DataError, match="between 1 and 718"):
        next(digits.train_batches(719, process_count=2))
    with pytest.raises(DataError, match="batch size"):
        next(folder.train_batches(13, workers=0))
    with pytest.raises(DataError, match="positive batch size"):
        next(digits.eval_batches(0))
    with pytest.raises(DataError, match="process_index"):
        next(digits.train_batches(8, process_index=2, process_count=2))


def test_error_val_fraction(tmp_path):
    root = make_folder(tmp_path / "d", corrupt=False)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match=r"val_fraction=.* not in \(0, 1\)"):
            load_image_folder(root, 8, val_fraction=bad)


def test_error_class_without_train_example(tmp_path):
    root = make_folder(tmp_path / "d", corrupt=False)
    (root / "solo").mkdir()
    Image.new("RGB", (10, 10), (5, 5, 5)).save(root / "solo" / "only.png")
    with pytest.raises(DataError, match="'solo' has 1 image.*lower val_fraction"):
        load_image_folder(root, 8, val_fraction=0.6)
    assert load_image_folder(root, 8, val_fraction=0.2).train_size == 3 * 5 + 1  # round(0.2 * 1) = 0 held out


def test_folder_transforms_flip_and_central_crop(tmp_path):
    # tall 16x64 images: red top quarter, green middle half, blue bottom quarter; the red channel
    # also ramps up left to right, so a horizontal flip shows up as a falling ramp
    pixels = np.zeros((64, 16, 3), np.uint8)
    pixels[:16, :, 0], pixels[16:48, :, 1], pixels[48:, :, 2] = 255, 200, 255
    pixels[16:48, :, 0] = np.linspace(0, 120, 16).astype(np.uint8)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path, 8, val_fraction=0.2)
    # eval: shorter side 16 -> round(8 * 8 / 7) = 9, so 9x36, and the central 8x8 is all green
    val = next(ds.eval_batches(2))["image"]
    np.testing.assert_array_equal(val[..., 2], -1.0)
    assert (val[..., 1] > 0.4).all()
    assert (np.diff(val[..., 0].mean(axis=1), axis=1) > 0).all()  # ramp rises left to right

    def ramp_falls(batches):
        ramps = np.concatenate([b["image"][..., 0].mean(axis=1) for b in batches])
        return (ramps[:, -1] < ramps[:, 0]).mean()

    assert ramp_falls(take(ds.train_batches(8, workers=0, augment=False), 3)) == 0
    assert 0.25 < ramp_falls(take(ds.train_batches(8, workers=0, seed=1), 8)) < 0.75  # ~half flipped


def test_eval_batches_over_the_train_split_cover_it_in_order(digits):
    batches = list(digits.eval_batches(500, split="train"))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, digits.train.labels)
    with pytest.raises(DataError, match="split"):
        next(digits.eval_batches(8, split="test"))


def test_class_filter_keeps_those_classes_relabelled(digits):
    """'digits:classes=7,2-3' = sklearn's split with only 7, 2, 3, relabelled 0, 1, 2 in that order."""
    sub = load_dataset("digits:classes=7,2-3", 16)
    assert sub.class_names == ("7", "2", "3") and sub.name == "digits:classes=7,2-3"
    for split, full in ((sub.train, digits.train), (sub.val, digits.val)):
        keep = np.isin(full.labels, [7, 2, 3])
        np.testing.assert_array_equal(split.images, full.images[keep])
        np.testing.assert_array_equal(split.labels, np.array([0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 1, 2])[
            full.labels[keep]])
    assert load_dataset("digits:classes=0,9", 8).num_classes == 2


@pytest.mark.parametrize("spec, message", [
    ("0-12", "at least two distinct classes among indices 0-9"),
    ("3", "at least two distinct classes"),
    ("1,1", "at least two distinct classes"),
    ("1,cat", "class 'cat' is not one of the data's classes"),
])
def test_class_filter_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(f"digits:classes={spec}", 8)


def test_class_filter_on_a_streamed_folder_says_what_to_do(tmp_path):
    root = make_folder(tmp_path / "train", corrupt=False)
    with pytest.raises(DataError, match="make a folder with only the wanted class sub-folders"):
        load_dataset(f"{root}:classes=0,1", 16)


def test_class_filter_keeps_the_recipe_and_gets_its_own_workdir():
    from vit22b.recipes import recipe_for, train_config_for

    assert recipe_for("fashion-mnist:classes=0-6") is recipe_for("fashion-mnist")
    cfg = train_config_for(load_dataset("digits:classes=0-6", 16), "digits:classes=0-6")
    assert (cfg.workdir, cfg.model.num_classes, cfg.data) == ("workdirs/digits-classes-0-6", 7,
                                                              "digits:classes=0-6")
    assert cfg.optim.learning_rate == 3e-3  # the digits recipe's
