"""Image-folder data sets: one sub-folder per class, read lazily.

Only each file's header is read here (image_files.header_ok), so listing a large folder costs
seconds per hundred thousand files; decoding happens in the training stream, where a file that is
corrupt past its header is replaced and counted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from vit22b.data import DataError, ImageDataset, Split, _stratified_split, _thread_map
from vit22b.image_files import IMAGE_EXTENSIONS, ImageFiles, header_ok


def _scan_folder(root: Path, what: str) -> tuple[tuple[str, ...], list[str], np.ndarray, int]:
    """Class names, image paths whose header reads, their labels, and the number of files skipped.

    Only headers are read (no decode): a file whose data is corrupt past its header is found, skipped
    and counted when the stream decodes it."""
    if not root.exists():
        raise DataError(f"{what} {str(root)!r} does not exist: pass an existing folder with one "
                        "sub-folder per class, or 'digits' for the bundled toy dataset.")
    if not root.is_dir():
        raise DataError(f"{what} {str(root)!r} is a file, not a folder: pass the folder that holds "
                        "one sub-folder per class (<folder>/<class>/<image>).")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{what} {str(root)!r} has no class sub-folders: put each class's images in "
                        "their own sub-folder, <folder>/<class>/<image>.")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(str(p) for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"class folder {str(root / name)!r} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder.")
        files += found
        labels += [label] * len(found)
    ok = np.array(_thread_map(header_ok, files), dtype=bool)
    bad = [f for f, good in zip(files, ok, strict=True) if not good]
    if not ok.any():
        raise DataError(f"none of the {len(files)} image files under {str(root)!r} could be opened "
                        f"(all {len(bad)} skipped as corrupt or truncated, e.g. {bad[:3]}): "
                        "check the files, e.g. open them with PIL.")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {str(root)!r}, e.g. {bad[:3]}",
                      stacklevel=3)
    label_arr = np.asarray(labels, dtype=np.int32)[ok]
    for label, name in enumerate(classes):
        if not (label_arr == label).any():
            raise DataError(f"class {name!r} in {str(root)!r} has no readable image: replace its "
                            "corrupt files or remove the folder.")
    return tuple(classes), [f for f, good in zip(files, ok, strict=True) if good], label_arr, len(bad)


def load_image_folder(path: str | Path, image_size: int, *, val_path: str | Path | None = None,
                      val_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """A folder with one sub-folder per class; files whose header does not read are skipped here."""
    if image_size <= 0:
        raise DataError(f"image_size={image_size}: use a positive image size (e.g. 224).")
    classes, files, labels, skipped = _scan_folder(Path(path), "dataset folder")
    if val_path is None:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction} is not in (0, 1): use e.g. 0.2, or pass a "
                            "separate val folder.")
        tr, va = _stratified_split(labels, classes, val_fraction, seed)
        train = Split(labels[tr], encoded=ImageFiles(tuple(files[i] for i in tr)))
        val = Split(labels[va], encoded=ImageFiles(tuple(files[i] for i in va)))
    else:
        val_classes, val_files, val_labels, val_skipped = _scan_folder(Path(val_path), "val folder")
        if val_classes != classes:
            raise DataError(f"val folder {str(val_path)!r} has classes {list(val_classes)} but the train "
                            f"folder {str(path)!r} has {list(classes)}: give both the same class "
                            "sub-folders.")
        train = Split(labels, encoded=ImageFiles(tuple(files)))
        val = Split(val_labels, encoded=ImageFiles(tuple(val_files)))
        skipped += val_skipped
    return ImageDataset(name=str(path), class_names=classes, image_size=image_size, in_channels=3,
                        train=train, val=val, skipped=skipped)
