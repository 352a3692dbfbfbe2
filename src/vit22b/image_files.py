"""Encoded images (JPEG/PNG/...) from folders or ArrayRecord shards, streamed through grain workers.

Nothing is decoded up front: a folder scan opens each file's header only (PIL reads a few hundred
bytes to learn the format and size), so a million-image folder is listed in minutes, not decoded
for hours. Decoding and augmentation run per element inside the stream, in grain worker processes
when `workers > 0`, with a bounded prefetch buffer per worker.

Determinism: stream position k is decoded with an rng that grain seeds from (seed, k), and a batch is
a fixed range of positions, so the batch at step s is the same for any worker count and after a
resume. A file that fails to decode is replaced by the next decodable example further along the
stream (a deterministic choice) and reported in the batch's `skipped_index` so the trainer can count
it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np
from PIL import Image

from vit22b.interrupt import ignore_sigint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Replacement attempts for an undecodable example before the stream gives up on the data set.
_MAX_REPLACEMENTS = 32
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class EncodedImages(Protocol):
    """Random access to encoded image bytes."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Encoded images as files on disk (a folder data set)."""

    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        return Path(self.paths[i]).read_bytes()

    def name(self, i: int) -> str:
        return self.paths[i]


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """A fully decoded RGB image. Palette images go through RGBA (as PIL advises), and 16/32-bit
    grayscale (PNG "I;16"/"I") is scaled to 8 bits: PIL's own conversion clips it to white."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        if im.mode == "P":
            im = im.convert("RGBA")
        elif im.mode.startswith("I") or im.mode == "F":
            deep = np.asarray(im, dtype=np.float64)
            scale = 255.0 / 65535.0 if im.mode.startswith("I") else 255.0
            im = Image.fromarray(np.clip(np.round(deep * scale), 0, 255).astype(np.uint8), "L")
        return im.convert("RGB")  # also fully decodes: raises on truncated/corrupt data


def eval_image(source: str | Path | bytes, size: int) -> np.ndarray:
    """Shorter side -> round(size * 8 / 7), then the central size x size crop (256/224 ratio)."""
    im = open_rgb(source)
    w, h = im.size
    short = round(size * 8 / 7)
    nw, nh = (short, max(size, round(h * short / w))) if w <= h else (max(size, round(w * short / h)), short)
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def train_image(source: str | Path | bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop (area 0.35..1, aspect 3/4..4/3) to size x size, then a random flip."""
    im = open_rgb(source)
    w, h = im.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            break
    else:  # no sample fitted (extreme aspect ratio): central square crop
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    out = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


def header_ok(path: str) -> bool:
    """The file opens as an image of positive size: a header read, not a decode."""
    try:
        with Image.open(path) as im:
            return im.width > 0 and im.height > 0
    except _DECODE_ERRORS:
        return False


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 in [-1, 1], the model's input contract."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class DecodeTrainExample:
    """Stream position k -> {"image", "label", "skipped_index"}: a picklable grain `random_map`.

    An undecodable example is replaced by the first decodable one at positions k + n, k + 2n, ...
    (the same position in later epochs: other examples), and its index is reported (-1: none)."""

    encoded: Any  # EncodedImages
    labels: np.ndarray
    order: Any  # data._EpochOrder: position -> example index
    image_size: int
    augment: str  # data.AUGMENTATIONS: "crop_flip", "flip" or "none"
    in_channels: int = 3

    def __call__(self, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        skipped = -1
        n = len(self.labels)
        for attempt in range(_MAX_REPLACEMENTS):
            i = self.order[k + attempt * n]
            try:
                data = self.encoded[i]
                if self.augment == "crop_flip":
                    image = train_image(data, self.image_size, rng)
                else:
                    image = eval_image(data, self.image_size)
                    if self.augment == "flip" and rng.random() < 0.5:
                        image = image[:, ::-1]
            except _DECODE_ERRORS:
                skipped = i if skipped < 0 else skipped
                continue
            # uint8 (a quarter of float32's bytes through the workers' queues); stream_batches
            # normalises whole batches in the trainer's process.
            return {"image": _channels(image, self.in_channels),
                    "label": self.labels[i], "skipped_index": np.int64(skipped)}
        raise OSError(f"{_MAX_REPLACEMENTS} examples in a row failed to decode near stream position {k}: "
                      "the data set is mostly corrupt; check it with `vit22b prepare-data` or PIL")


def _channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    if in_channels == 1:  # ITU-R 601 luma, as PIL's "L" mode
        return np.asarray(Image.fromarray(image).convert("L"))[..., None]
    return image


def stream_batches(element: DecodeTrainExample, batch_size: int, *, seed: int, start_step: int,
                   process_index: int, process_count: int, workers: int,
                   buffer_per_worker: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Per-process batches from `start_step` on: global step s = per-process batches s*n .. s*n+n-1."""
    batches = grain.MapDataset.source(element.order).random_map(element, seed=seed).batch(
        batch_size, drop_remainder=True)
    mine = batches[start_step * process_count + process_index::process_count]
    if workers <= 0:
        for j in range(sys.maxsize):
            yield _normalised(mine[j])
        return
    _absl_flags_parsed()
    iterator = iter(mine.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer_per_worker),
        worker_init_fn=ignore_sigint))  # Ctrl-C is the trainer's to handle (interrupt.py)
    try:
        for batch in iterator:
            yield _normalised(batch)
    finally:  # stop the workers now, not in a __del__ at interpreter exit
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _normalised(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "image": normalise(batch["image"])}


def _absl_flags_parsed() -> None:
    """grain's workers read absl flags; outside an absl app nobody parsed them (a no-op otherwise)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def decode_eval_batch(encoded: EncodedImages, indices: Sequence[int], image_size: int,
                      in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, S, S, C] of `indices` in order, and a mask: False where decoding failed
    (those rows are blank). Decoded by a thread pool: PIL releases the GIL while decoding."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> np.ndarray | None:
        try:
            return _channels(eval_image(encoded[i], image_size), in_channels)
        except _DECODE_ERRORS:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        decoded = list(pool.map(one, indices))
    ok = np.array([d is not None for d in decoded], dtype=bool)
    blank = np.zeros((image_size, image_size, in_channels), np.uint8)
    return np.stack([d if d is not None else blank for d in decoded]), ok
