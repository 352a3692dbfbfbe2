"""Image data for training and evaluation: scikit-learn's digits, or a folder of class sub-folders.

Both kinds give an `ImageDataset` with a train and a held-out (val) split. `train_batches` is an
infinite, *random-access* stream: the batch at step s is a pure function of (seed, s), so a run
resumed at step s sees exactly the batches an uninterrupted run sees from there on. The stream is
the train split's examples in a fresh permutation per epoch (seeded by (seed, epoch)); batches may
straddle an epoch boundary. With several processes, step s's global batch is `batch_size *
process_count` consecutive stream positions and process i gets the i-th slice of it.

In-memory data sets (digits, MNIST-format files such as Fashion-MNIST: see idx.py) hold uint8 images
and are batched and augmented (random translation, flips where the data allow) with whole-batch
numpy ops, a fraction of a millisecond per batch. Encoded images (folders, ArrayRecord shards) are
streamed: decoded per element in grain worker processes with prefetch (image_files.py). The
per-epoch order is a numpy permutation rather than grain's `shuffle`: grain's index shuffle costs
~25 us per element, 3 ms for a batch of 128, too slow for the in-memory stream.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vit22b.image_files import (
    DecodeTrainExample,
    EncodedImages,
    ImageFiles,
    decode_eval_batch,
    eval_image,
    normalise,
    stream_batches,
)

Batch = dict[str, np.ndarray]


def default_workers() -> int:
    """Decoding processes for streamed data: all cores but one (the step needs one), at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class DataError(ValueError):
    """Data that can't be used: the message names the cause and the fix."""


# Training augmentation, `--augment`: "crop_flip" (in memory: a random translation of up to 1/8 of
# the side, background-padded; files: a random-resized crop) plus a horizontal flip where the data
# set allows one; "flip" the flip alone; "none". Short runs on small images learn faster without
# the translation (README, "Real data").
AUGMENTATIONS = ("crop_flip", "flip", "none")


def augment_mode(augment: bool | str) -> str:
    """An augmentation name from AUGMENTATIONS; True/False mean "crop_flip"/"none"."""
    if isinstance(augment, bool):
        return "crop_flip" if augment else "none"
    if augment not in AUGMENTATIONS:
        raise DataError(f"augment={augment!r}: choose one of {', '.join(AUGMENTATIONS)} (--augment)")
    return augment


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split: labels plus either in-memory images or encoded ones (files, ArrayRecord records)."""

    labels: np.ndarray  # int32 [N]
    images: np.ndarray | None = None  # uint8 [N, S, S, C], already at image_size
    encoded: EncodedImages | None = None  # decoded on demand

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def paths(self) -> tuple[str, ...]:
        return self.encoded.paths if isinstance(self.encoded, ImageFiles) else ()


class _EpochOrder:
    """Train-stream position k -> example index: epoch k // n is a permutation seeded by (seed, epoch).

    Random access (a grain source: `len` is effectively infinite); keeps the last few epochs' orders.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __getitem__(self, k: int) -> int:
        return int(self._perm(k // self.n)[k % self.n])

    def take(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out


_normalise = normalise


def load_image(path: str | Path, image_size: int, in_channels: int = 3) -> np.ndarray:
    """One image file as the model sees it at evaluation: float32 [S, S, C] in [-1, 1]."""
    try:
        image = eval_image(str(path), image_size)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {str(path)!r} ({e}): pass a JPEG/PNG file") from e
    if in_channels == 1:  # ITU-R 601 luma, as PIL's "L" mode
        image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
    return _normalise(image)


def _thread_map(fn: Callable[[str], object], paths: Sequence[str]) -> list:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, paths))


def _pad_batch(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Batch:
    n = len(labels)
    mask = np.arange(batch_size) < n
    if n < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(batch_size - n, labels.dtype)])
    return {"image": _normalise(images), "label": labels.astype(np.int32), "mask": mask}


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A train and a val split of same-sized images; see the module docstring for the streams."""

    name: str  # "digits" or the folder path
    class_names: tuple[str, ...]
    image_size: int
    in_channels: int  # 1 for digits, 3 for folders (RGB)
    train: Split
    val: Split
    skipped: int  # unreadable files skipped at load time
    # Random horizontal flips in training: right for photos and clothes, wrong for digits.
    flip: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def val_size(self) -> int:
        return len(self.val)

    def train_batches(
        self, batch_size: int, *, seed: int = 0, start_step: int = 0, augment: bool | str = True,
        process_index: int = 0, process_count: int = 1, workers: int | None = None,
    ) -> Iterator[Batch]:
        """Infinite {"image": f32 [B, S, S, C] in [-1, 1], "label": i32 [B]}; batch s = f(seed, s).

        `batch_size` is per process; process i of n gets slice i of the global batch (B * n).
        Streamed (encoded) data add "skipped_index" i64 [B]: the example an undecodable file was
        replaced for, -1 for none. `workers`: decoding processes (None: `default_workers()`; 0:
        decode in this process); the batches are the same for any count. `augment`: one of
        AUGMENTATIONS (True: "crop_flip", False: "none").
        """
        augment = augment_mode(augment)
        global_batch = batch_size * process_count
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} with process_count={process_count}: "
                            "need process_count >= 1 and 0 <= process_index < process_count.")
        if batch_size <= 0 or global_batch > self.train_size:
            raise DataError(f"batch_size={batch_size} x {process_count} process(es) does not fit the "
                            f"{self.train_size}-example train split of {self.name!r}: use a batch size "
                            f"between 1 and {self.train_size // process_count}.")
        if start_step < 0:
            raise DataError(f"start_step={start_step} is negative: pass the step to resume from (>= 0).")
        order = _EpochOrder(self.train_size, seed)
        if self.train.images is not None:
            yield from self._memory_batches(order, batch_size, process_count, process_index, seed,
                                            start_step, augment)
            return
        element = DecodeTrainExample(self.train.encoded, self.train.labels, order, self.image_size,
                                     augment, self.in_channels)
        yield from stream_batches(element, batch_size, seed=seed, start_step=start_step,
                                  process_index=process_index, process_count=process_count,
                                  workers=default_workers() if workers is None else workers)

    def _memory_batches(
        self, order: _EpochOrder, batch_size: int, process_count: int, process_index: int,
        seed: int, step: int, augment: str,
    ) -> Iterator[Batch]:
        """In-memory images, augmented ("crop_flip") by a random translation (pad with background 0,
        crop back) and, where the data set allows it, a random horizontal flip ("flip": that alone).
        Both are one gather of row and column indices."""
        images, labels, size = self.train.images, self.train.labels, self.image_size
        assert images is not None
        pad = max(1, size // 8)
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        global_batch = batch_size * process_count
        mine = slice(process_index * batch_size, (process_index + 1) * batch_size)
        rows = np.arange(batch_size)[:, None, None]
        grid = np.arange(size)
        while True:
            idx = order.take(step * global_batch + process_index * batch_size, batch_size)
            # random draws cover the whole global batch, so each process's share matches any layout
            if augment == "crop_flip":
                off = np.random.default_rng([seed, 1, step]).integers(0, 2 * pad + 1, (global_batch, 2))
            else:  # no translation: the crop at offset `pad` is the image itself
                off = np.full((global_batch, 2), pad)
            ys, xs = off[mine, 0:1] + grid, off[mine, 1:2] + grid  # [B, S] each
            if self.flip and augment != "none":  # mirrored column indices flip in the same gather
                flips = np.random.default_rng([seed, 2, step]).random(global_batch)[mine] < 0.5
                xs = np.where(flips[:, None], xs[:, ::-1], xs)
            batch = images[idx] if augment == "none" else padded[idx][rows, ys[:, :, None], xs[:, None, :]]
            yield {"image": _normalise(batch), "label": labels[idx]}
            step += 1

    def eval_batches(self, batch_size: int, split: str = "val") -> Iterator[Batch]:
        """One in-order pass over a split (val by default) without augmentation; the last batch is
        padded, "mask" marks the real examples (and is False for a file that fails to decode)."""
        if batch_size <= 0:
            raise DataError(f"eval batch_size={batch_size}: use a positive batch size.")
        if split not in ("train", "val"):
            raise DataError(f"split {split!r}: use 'train' or 'val'")
        data = self.train if split == "train" else self.val
        for start in range(0, len(data), batch_size):
            labels = data.labels[start:start + batch_size]
            if data.images is not None:
                yield _pad_batch(data.images[start:start + batch_size], labels, batch_size)
                continue
            images, ok = decode_eval_batch(data.encoded, range(start, start + len(labels)),
                                           self.image_size, self.in_channels)
            batch = _pad_batch(images, labels, batch_size)
            batch["mask"][:len(ok)] &= ok
            yield batch


def _digits_to_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """[N, 8, 8] values 0..16 -> uint8 [N, size, size, 1], bilinear upsampling."""
    u8 = np.round(images * (255 / 16)).astype(np.uint8)
    if size != u8.shape[1]:
        u8 = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                       for im in u8])
    return u8[..., None]


def load_digits_dataset(image_size: int = 16) -> ImageDataset:
    """scikit-learn's digits; val is exactly train_test_split(test_size=0.2, stratify=y, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size <= 0:
        raise DataError(f"image_size={image_size}: use a positive image size (e.g. 16).")
    digits = load_digits()
    x_tr, x_val, y_tr, y_val = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    return ImageDataset(
        name="digits", class_names=tuple(str(c) for c in range(10)), image_size=image_size,
        in_channels=1, skipped=0, flip=False,
        train=Split(y_tr.astype(np.int32), images=_digits_to_uint8(x_tr, image_size)),
        val=Split(y_val.astype(np.int32), images=_digits_to_uint8(x_val, image_size)))


def _stratified_split(labels: np.ndarray, classes: Sequence[str], val_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each in the original order; round(fraction * n_c) of class c to val."""
    rng = np.random.default_rng(seed)
    val = []
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels == label)
        n_val = round(val_fraction * len(members))
        if n_val >= len(members):
            raise DataError(f"class {name!r} has {len(members)} image(s), all of them held out by "
                            f"val_fraction={val_fraction}: add images, lower val_fraction or pass "
                            "a separate val folder.")
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 1] -> [N, size, size, 1], bilinear (nothing done at the native size)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((size, size), Image.Resampling.BILINEAR))
                     for im in images])[..., None]


def load_idx_dataset(source: str, image_size: int | None = None, *, holdout: str = "test",
                     val_fraction: float = 0.1, seed: int = 0) -> ImageDataset:
    """An MNIST-format data set in memory (see idx.py). `holdout="test"`: val is the data set's own
    test split; `"train"`: a stratified `val_fraction` of the training images, for choosing a recipe
    without looking at the test split."""
    from vit22b.idx import class_names_for, read_idx_split, resolve_idx_source

    directory = resolve_idx_source(source)
    assert directory is not None, source
    x_tr, y_tr = read_idx_split(directory, "train")
    if holdout == "test":
        x_val, y_val = read_idx_split(directory, "t10k")
    elif holdout == "train":
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} is not in (0, 1): use e.g. 0.1")
        classes = [str(c) for c in range(int(y_tr.max()) + 1)]
        # seed fixed: every recipe in a search is chosen on the same val images
        tr, va = _stratified_split(y_tr, classes, val_fraction, seed=0)
        x_tr, y_tr, x_val, y_val = x_tr[tr], y_tr[tr], x_tr[va], y_tr[va]
    else:
        raise DataError(f"holdout={holdout!r}: use 'test' (the data set's test split) or 'train' "
                        "(a split of the training images)")
    num_classes = int(max(y_tr.max(), y_val.max())) + 1
    size = image_size or x_tr.shape[1]
    name = source if source == "fashion-mnist" else str(directory)
    return _checked(ImageDataset(
        name=name, class_names=class_names_for(directory, num_classes), image_size=size, in_channels=1,
        skipped=0, train=Split(y_tr, images=_resize_uint8(x_tr, size)),
        val=Split(y_val, images=_resize_uint8(x_val, size))))


def _checked(dataset: ImageDataset) -> ImageDataset:
    """Refuse data sets that can't train a classifier (one class reports a meaningless 100%)."""
    present = np.unique(dataset.train.labels)
    if len(present) < 2:
        raise DataError(f"{dataset.name!r} has a single class ({dataset.class_names[int(present[0])]!r}) in "
                        "its training split: a classifier needs at least two classes; add the other "
                        "classes' images")
    return dataset


CLASS_FILTER = ":classes="  # e.g. "fashion-mnist:classes=0-6": those classes only, relabelled 0..k-1


def base_source(source: str) -> str:
    """The data set a source names, without its class filter."""
    return source.split(CLASS_FILTER, 1)[0]


def parse_class_filter(spec: str, class_names: Sequence[str]) -> list[int]:
    """"0-6", "0,2,5" or "Trouser,Bag" (names or indices, ranges of indices) -> class indices."""
    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, dash, hi = part.partition("-")
        if dash and lo.isdigit() and hi.isdigit():
            chosen += range(int(lo), int(hi) + 1)
        elif part.isdigit():
            chosen.append(int(part))
        elif part in class_names:
            chosen.append(list(class_names).index(part))
        else:
            raise DataError(f"class {part!r} is not one of the data's classes ({', '.join(class_names)}) "
                            f"nor an index 0-{len(class_names) - 1}: fix the ':classes=' list")
    bad = [c for c in chosen if not 0 <= c < len(class_names)]
    if bad or len(set(chosen)) != len(chosen) or len(chosen) < 2:
        raise DataError(f"':classes={spec}' must name at least two distinct classes among indices 0-"
                        f"{len(class_names) - 1} ({', '.join(class_names)})")
    return chosen


def select_classes(dataset: ImageDataset, spec: str) -> ImageDataset:
    """Only the classes `spec` names, in its order, relabelled 0..k-1 (e.g. pretraining on some
    classes of a data set and transferring to all of them)."""
    keep = parse_class_filter(spec, dataset.class_names)
    if dataset.train.images is None or dataset.val.images is None:
        raise DataError(f"':classes=' works on in-memory data (digits, fashion-mnist, idx:DIR); for "
                        f"{dataset.name!r} make a folder with only the wanted class sub-folders")
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[keep] = np.arange(len(keep), dtype=np.int32)

    def only(split: Split) -> Split:
        idx = np.flatnonzero(relabel[split.labels] >= 0)
        return Split(relabel[split.labels[idx]], images=split.images[idx])

    return dataclasses.replace(dataset, name=f"{dataset.name}{CLASS_FILTER}{spec}",
                               class_names=tuple(dataset.class_names[c] for c in keep),
                               train=only(dataset.train), val=only(dataset.val))


def load_dataset(source: str, image_size: int | None, *, val_path: str | Path | None = None,
                 val_fraction: float = 0.2, seed: int = 0, holdout: str = "test") -> ImageDataset:
    """"digits" (bundled; its split is fixed), "fashion-mnist" or "idx:DIR" (MNIST format, in
    memory), a `vit22b prepare-data` directory (ArrayRecord), else an image folder; any of them
    with a ":classes=..." suffix keeps only those classes (select_classes).
    `image_size=None`: the data set's native size (folders: 224)."""
    if CLASS_FILTER in source:
        base, spec = source.split(CLASS_FILTER, 1)
        return select_classes(load_dataset(base, image_size, val_path=val_path, val_fraction=val_fraction,
                                           seed=seed, holdout=holdout), spec)
    from vit22b.idx import resolve_idx_source

    if source == "digits":
        if val_path is not None:
            raise DataError("the digits dataset has a fixed val split: drop the val folder, or train "
                            "on an image folder instead.")
        return load_digits_dataset(image_size or 16)
    if resolve_idx_source(source) is not None:
        if val_path is not None:
            raise DataError(f"{source!r} brings its own test split: drop --val-data (or use "
                            "--holdout train to hold out part of the training images)")
        return load_idx_dataset(source, image_size, holdout=holdout, val_fraction=val_fraction, seed=seed)
    image_size = image_size or 224
    from vit22b.records import is_prepared, load_prepared

    if is_prepared(source):
        if val_path is not None:
            raise DataError("a prepared (ArrayRecord) directory carries its own val split: drop "
                            "--val-data, or pass --val to `vit22b prepare-data`")
        return load_prepared(source, image_size, val_fraction=val_fraction, seed=seed)
    from vit22b.folders import load_image_folder

    return _checked(load_image_folder(source, image_size, val_path=val_path, val_fraction=val_fraction,
                                      seed=seed))
