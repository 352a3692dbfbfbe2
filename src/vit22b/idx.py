"""MNIST-format (IDX) data sets by name: `--data fashion-mnist`, or `--data idx:DIR` for any directory
holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
`t10k-labels-idx1-ubyte` (each optionally gzipped).

IDX is LeCun's format: a 4-byte magic (two zero bytes, a type code, the number of dimensions), the
dimensions as big-endian int32, then the raw array. No library that vit22b already depends on reads
it (torchvision and tensorflow-datasets do, but bring a framework and a download step), and the
reader is twenty lines of numpy, so it lives here.

The whole data set is held in memory as uint8 (Fashion-MNIST: 55 MB), like digits, so the training
step never waits on decoding; the held-out split is the data set's own test split.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# Debian's `dataset-fashion-mnist` package installs the four gzipped files here.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_MAX_ELEMENTS = 1 << 32  # refuse headers that promise more than 4 G elements (a shape bomb)


class IdxError(ValueError):
    """An IDX file or directory that can't be read; the message names the cause and the fix."""


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzipped or not) as a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise IdxError(f"cannot read IDX file {str(path)!r} ({e}): re-download or reinstall it") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IdxError(f"{str(path)!r} is not an IDX file (bad magic {data[:4].hex()}): pass an "
                       "MNIST-format file such as train-images-idx3-ubyte[.gz]")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"IDX file {str(path)!r} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > _MAX_ELEMENTS or len(data) - header != count * dtype.itemsize:
        raise IdxError(f"IDX file {str(path)!r} declares shape {shape} ({count * dtype.itemsize} bytes) "
                       f"but holds {len(data) - header} bytes of data: the file is truncated or "
                       "corrupt; re-download it")
    array = np.frombuffer(data, dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise IdxError(f"{str(directory)!r} has no {stem}[.gz]: an IDX directory needs train-images-idx3-ubyte, "
                   "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be "
                   "gzipped)")


def read_idx_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 1], labels int32 [N]) of split 'train' or 't10k'."""
    directory = Path(directory)
    images = read_idx(_find(directory, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxError(f"{split} images in {str(directory)!r} are {images.dtype} {images.shape}: "
                       "expected uint8 [N, H, W] grayscale images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxError(f"{split} labels in {str(directory)!r} have shape {labels.shape} for "
                       f"{len(images)} images: expected one label per image")
    return images[..., None], labels.astype(np.int32)


def resolve_idx_source(source: str) -> Path | None:
    """The IDX directory a `--data` value names ('fashion-mnist', 'idx:DIR'), or None for others."""
    if source == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise IdxError(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): install it "
                           "with 'apt-get install -y dataset-fashion-mnist' (Debian/Ubuntu), or pass "
                           "--data idx:DIR with the four IDX files from the data set's site")
        return FASHION_MNIST_DIR
    if source.startswith("idx:"):
        directory = Path(source[len("idx:"):])
        if not directory.is_dir():
            raise IdxError(f"IDX directory {str(directory)!r} does not exist: pass --data idx:DIR with the "
                           "folder that holds the four MNIST-format files")
        return directory
    return None


def class_names_for(directory: Path, num_classes: int) -> tuple[str, ...]:
    if directory == FASHION_MNIST_DIR and num_classes == len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES
    return tuple(str(c) for c in range(num_classes))
