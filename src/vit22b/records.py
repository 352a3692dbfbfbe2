"""`vit22b prepare-data`: an image-folder data set as sharded ArrayRecord files, and reading them back.

ArrayRecord is grain's native random-access format (the `array-record` package): the trainer's
stream asks for example i of the epoch permutation, and ArrayRecord answers without reading the
rest of the shard. Each process of a multi-host run reads only the records of its own slice of
every global batch (the positions `data.py` assigns it), never the whole data set.

Layout of a prepared directory:
    info.json                       {"format": FORMAT, "classes": [...], "splits": {"train": {...}}}
    train-00000-of-00004.array_record ...   one record per image: int32 label (little-endian) + the
                                            image file's bytes as they were (JPEG/PNG; no re-encode)
    train_labels.npy, val_labels.npy        the labels again, so loading needs no pass over records
Nothing in it is pickled: labels are read with `np.load(allow_pickle=False)`, records are raw bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from vit22b.data import DataError, ImageDataset, Split, _checked, _stratified_split
from vit22b.folders import _scan_folder

FORMAT = "vit22b-arrayrecord-v1"
INFO_FILE = "info.json"
_LABEL_BYTES = 4


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / INFO_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class ArrayRecordImages:
    """Encoded images in ArrayRecord shards (random access; picklable for grain's workers)."""

    shards: tuple[str, ...]

    def __post_init__(self) -> None:
        import grain

        object.__setattr__(self, "_source", grain.sources.ArrayRecordDataSource(list(self.shards)))

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[attr-defined]

    def __getitem__(self, i: int) -> bytes:
        return self.record(i)[_LABEL_BYTES:]

    def record(self, i: int) -> bytes:
        return self._source[int(i)]  # type: ignore[attr-defined]

    def __reduce__(self) -> tuple:  # workers reopen the shards rather than pickling file handles
        return (ArrayRecordImages, (self.shards,))


def _write_split(name: str, files: list[str], labels: np.ndarray, out: Path, shards: int) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    shards = max(1, min(shards, len(files)))
    names = [f"{name}-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
    per = math.ceil(len(files) / shards)
    for s, shard in enumerate(names):
        # group_size:1 makes every record individually addressable (what random access needs)
        writer = ArrayRecordWriter(str(out / shard), "group_size:1")
        for path, label in zip(files[s * per:(s + 1) * per], labels[s * per:(s + 1) * per], strict=True):
            writer.write(np.int32(label).astype("<i4").tobytes() + Path(path).read_bytes())
        writer.close()
    np.save(out / f"{name}_labels.npy", labels.astype(np.int32), allow_pickle=False)
    return {"shards": names, "count": len(files), "labels": f"{name}_labels.npy"}


def prepare(src: str | Path, out: str | Path, *, val_src: str | Path | None = None,
            val_fraction: float = 0.0, seed: int = 0, images_per_shard: int = 10_000) -> dict:
    """Write the folder `src` (one sub-folder per class) as ArrayRecord shards under `out`.

    Files whose header does not read are skipped and counted, as in training. The val split is
    `val_src` if given, else a stratified `val_fraction` of `src` (0: no val split written)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output directory {str(out)!r} is not empty: pass a new --out directory")
    classes, files, labels, skipped = _scan_folder(Path(src), "source folder")
    splits: dict[str, tuple[list[str], np.ndarray]] = {}
    if val_src is not None:
        val_classes, val_files, val_labels, val_skipped = _scan_folder(Path(val_src), "val folder")
        if val_classes != classes:
            raise DataError(f"val folder classes {list(val_classes)} differ from {list(classes)}: give "
                            "both folders the same class sub-folders")
        splits["train"], splits["val"] = (files, labels), (val_files, val_labels)
        skipped += val_skipped
    elif val_fraction > 0:
        tr, va = _stratified_split(labels, classes, val_fraction, seed)
        splits["train"] = ([files[i] for i in tr], labels[tr])
        splits["val"] = ([files[i] for i in va], labels[va])
    else:
        splits["train"] = (files, labels)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "classes": list(classes), "skipped_files": skipped, "splits": {}}
    for name, (split_files, split_labels) in splits.items():
        n_shards = math.ceil(len(split_files) / images_per_shard)
        info["splits"][name] = _write_split(name, split_files, split_labels, out, n_shards)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def _read_split(root: Path, info: dict, name: str) -> Split:
    split = info["splits"][name]
    labels = np.load(root / split["labels"], allow_pickle=False)
    images = ArrayRecordImages(tuple(str(root / s) for s in split["shards"]))
    if len(images) != len(labels) or len(labels) != split["count"]:
        raise DataError(f"{str(root)!r}: split {name!r} has {len(images)} records and {len(labels)} labels "
                        f"where info.json says {split['count']}: the directory is incomplete; run "
                        "`vit22b prepare-data` again into a new directory")
    return Split(labels.astype(np.int32), encoded=images)


def load_prepared(path: str | Path, image_size: int, *, val_fraction: float = 0.2,
                  seed: int = 0) -> ImageDataset:
    """A `prepare-data` directory as an ImageDataset (RGB); val: its val split, else a stratified
    `val_fraction` of train."""
    root = Path(path)
    try:
        info = json.loads((root / INFO_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {str(root / INFO_FILE)!r} ({e}): run `vit22b prepare-data` "
                        "again") from e
    if info.get("format") != FORMAT:
        raise DataError(f"{str(root)!r} holds format {info.get('format')!r}, not {FORMAT!r}: prepare it "
                        "again with this version's `vit22b prepare-data`")
    classes = tuple(info["classes"])
    train = _read_split(root, info, "train")
    if "val" in info["splits"]:
        val = _read_split(root, info, "val")
    else:
        tr, va = _stratified_split(train.labels, classes, val_fraction, seed)
        assert isinstance(train.encoded, ArrayRecordImages)
        val = Split(train.labels[va], encoded=_Subset(train.encoded, va))
        train = Split(train.labels[tr], encoded=_Subset(train.encoded, tr))
    return _checked(ImageDataset(name=str(root), class_names=classes, image_size=image_size, in_channels=3,
                                 train=train, val=val, skipped=int(info.get("skipped_files", 0))))


@dataclasses.dataclass(frozen=True, eq=False)
class _Subset:
    """Some records of an ArrayRecordImages, by index (a split carved out at load time)."""

    images: ArrayRecordImages
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> bytes:
        return self.images[int(self.indices[i])]
