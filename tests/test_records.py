"""`vit22b prepare-data`: ArrayRecord shards round-trip the folder exactly; each process reads its share."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from test_image_files import make_folder
from vit22b.cli import main
from vit22b.data import DataError, load_dataset
from vit22b.folders import load_image_folder
from vit22b.records import ArrayRecordImages, load_prepared, prepare


def take(it, n):
    return list(itertools.islice(it, n))


def test_round_trip_equals_the_folder(tmp_path):
    root = make_folder(tmp_path / "src", per_class=7)
    info = prepare(root, tmp_path / "ar", images_per_shard=4)
    assert info["splits"]["train"]["count"] == 14 and len(info["splits"]["train"]["shards"]) == 4
    names = sorted(p.name for p in (tmp_path / "ar").iterdir())
    assert names[:2] == ["info.json", "train-00000-of-00004.array_record"]
    folder = load_image_folder(root, 8, val_fraction=0.25, seed=3)
    records = load_dataset(str(tmp_path / "ar"), 8, val_fraction=0.25, seed=3)
    assert records.class_names == folder.class_names == ("a", "b")
    np.testing.assert_array_equal(records.train.labels, folder.train.labels)
    np.testing.assert_array_equal(records.val.labels, folder.val.labels)
    # the stored bytes are the files' bytes, so every batch is bit-identical to the folder's
    for a, b in zip(take(records.train_batches(4, seed=1, workers=0), 5),
                    take(folder.train_batches(4, seed=1, workers=0), 5), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(records.eval_batches(3), folder.eval_batches(3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_val_folder_and_cli(tmp_path, capsys):
    src, val = make_folder(tmp_path / "src", per_class=5), make_folder(tmp_path / "val", per_class=2)
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "ar"), "--val", str(val)]) == 0
    assert "train 10 images in 1 shard(s), val 4 images" in capsys.readouterr().out
    ds = load_prepared(tmp_path / "ar", 8)
    assert (ds.train_size, ds.val_size) == (10, 4)
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "ar")]) == 2  # not empty: refused
    assert "is not empty" in capsys.readouterr().err


def test_each_process_reads_only_its_share(tmp_path, monkeypatch):
    prepare(make_folder(tmp_path / "src", per_class=8), tmp_path / "ar")
    ds = load_prepared(tmp_path / "ar", 8, val_fraction=0.25)
    read: list[int] = []
    original = ArrayRecordImages.record
    monkeypatch.setattr(ArrayRecordImages, "record", lambda self, i: read.append(i) or original(self, i))
    whole = take(ds.train_batches(6, seed=2, start_step=1, workers=0), 1)  # one step: distinct examples
    whole_reads = set(read)
    shares, share_reads = [], []
    for i in range(2):
        read.clear()
        shares.append(take(ds.train_batches(3, seed=2, start_step=1, process_index=i, process_count=2,
                                            workers=0), 1))
        share_reads.append(set(read))
    assert not share_reads[0] & share_reads[1]  # disjoint: no process reads another's records
    assert share_reads[0] | share_reads[1] == whole_reads
    assert len(whole_reads) == 6
    np.testing.assert_array_equal(np.concatenate([sh[0]["image"] for sh in shares]), whole[0]["image"])


def test_damaged_directory_errors(tmp_path):
    prepare(make_folder(tmp_path / "src", per_class=3), tmp_path / "ar")
    info = json.loads((tmp_path / "ar" / "info.json").read_text())
    info["splits"]["train"]["count"] = 99
    (tmp_path / "ar" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="incomplete"):
        load_prepared(tmp_path / "ar", 8)
    (tmp_path / "ar" / "info.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_prepared(tmp_path / "ar", 8)
