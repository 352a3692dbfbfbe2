"""Clips for `vit22b video`: generated "moving digits", or a folder of users' clips.

Generated clips (no downloads, a pure function of the seed): a scikit-learn digit (8x8, upsampled
to `digit_size`, by default 7/8 of the canvas) slides in a straight line across a black canvas
over T frames, cut off where it leaves the canvas. The class is
(digit group) x (direction), directions `right` (left -> right), `left`, `down`, `up`. Reversing a
`right` clip in time gives exactly the `left` clip with the same digit, extent and offset (see
`trajectory`), so the *set* of frames of a class and its reverse class has the same distribution:
temporal mean pooling is at chance between them (at most 50% on those pairs), a model that sees
frame order is not. Train clips use the digits of data.py's train split, val clips the held-out
digits, so val measures generalisation to unseen digit images.

Users' clips: DIR/<class>/<clip>, or DIR/train/<class>/<clip> + DIR/val/<class>/<clip>. A clip is
a sub-folder of frame images (sorted by name), a multi-frame image file PIL reads (GIF, WebP,
APNG, TIFF; a still image is a 1-frame clip), or a uint8 .npy array [T, H, W, C] (loaded with
allow_pickle=False). Clips are scanned (frame counts, .npy headers) at load time and decoded
lazily, only the sampled frames: `sample_frame_indices` takes T frames uniformly (the centres of
T equal segments, as TSN / scenic's uniform sampling), repeating the last frame of shorter clips;
files whose frames have different durations are sampled uniformly in time (`sample_frame_times`).
Frames are converted to the checkpoint's channels (RGB, or luma for 1-channel checkpoints, as
data.load_image), their shorter side resized to the image size and centre-cropped.

`clip_features` runs every frame of every clip once through the frozen checkpoint (`common.load_backbone`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence
from tqdm.auto import tqdm

from vit22b.data import DataError, _stratified_split
from vit22b.image_files import IMAGE_EXTENSIONS, normalise
from vit22b.tasks.common import apply_batched, digit_glyphs

DIRECTIONS = ("right", "left", "down", "up")
# direction -> (axis of the (y, x) position that moves, sign); right/left and down/up are reverses.
_MOTION = {"right": (1, 1), "left": (1, -1), "down": (0, 1), "up": (0, -1)}
CLIP_FILE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".apng", ".tif", ".tiff", ".npy")


# ----------------------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True, eq=False)
class ClipSplit:
    """Labels plus either in-memory clips (generated) or clip sources decoded on demand (folders)."""

    labels: np.ndarray  # int32 [N]
    clips: np.ndarray | None = None  # uint8 [N, T, S, S, C]
    sources: tuple[str, ...] = ()  # frame folder / multi-frame file / .npy per clip
    frame_counts: tuple[int, ...] = ()  # frames available in each source

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ClipDataset:
    name: str  # "synthetic" or the folder path
    class_names: tuple[str, ...]
    image_size: int
    in_channels: int
    num_frames: int
    train: ClipSplit
    val: ClipSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> ClipSplit:
        if name not in ("train", "val"):
            raise DataError(f"split {name!r}: use 'train' or 'val'")
        return self.train if name == "train" else self.val

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """In-order (uint8 clips [b, T, S, S, C], int32 labels [b]); the last batch may be short."""
        data = self.split(split)
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            if data.clips is not None:
                yield data.clips[start:stop], data.labels[start:stop]
                continue
            args = [(data.sources[i], data.frame_counts[i]) for i in range(start, stop)]
            with ThreadPoolExecutor(max_workers=8) as pool:  # PIL decoding releases the GIL
                clips = list(pool.map(lambda a: decode_clip(*a, self.image_size, self.in_channels,
                                                            self.num_frames), args))
            yield np.stack(clips), data.labels[start:stop]


# ----------------------------------------------------------------------------- frame sampling
def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """T = num_frames indices into a clip of n frames: the centre of each of T equal segments,
    floor((2i + 1) n / 2T); a clip shorter than T gives 0..n-1 then n-1 repeated."""
    if num_available <= 0 or num_frames <= 0:
        raise DataError(f"cannot sample {num_frames} frame(s) from a clip of {num_available}: "
                        "both must be positive")
    i = np.arange(num_frames, dtype=np.int64)
    if num_available < num_frames:
        return np.minimum(i, num_available - 1)
    return (2 * i + 1) * num_available // (2 * num_frames)


def sample_frame_times(durations: list[int], num_frames: int) -> np.ndarray:
    """For frames shown for different times (GIF/WebP durations; GIF writers merge repeated frames
    into one longer one): the frame on screen at the centre of each of T equal time segments."""
    ends = np.cumsum(np.asarray(durations, np.int64))
    centres = (2 * np.arange(num_frames, dtype=np.int64) + 1) * ends[-1]  # x 2T, exact
    return np.searchsorted(2 * num_frames * ends, centres, side="right")


# ----------------------------------------------------------------------------- moving digits
def trajectory(direction: str, start: int, end: int, offset: int, num_frames: int) -> np.ndarray:
    """Top-left (y, x) of the digit in each frame, int [T, 2]. Along the motion axis it moves
    linearly from `start` to `end` (right/down) or `end` to `start` (left/up), rounded half up in
    exact integer arithmetic so `trajectory(left)[::-1] == trajectory(right)` bit for bit; the
    other coordinate is `offset`."""
    if direction not in _MOTION:
        raise DataError(f"direction {direction!r}: use one of {DIRECTIONS}")
    axis, sign = _MOTION[direction]
    a, b = (start, end) if sign > 0 else (end, start)
    den = max(num_frames - 1, 1)
    num = a * den + (b - a) * np.arange(num_frames, dtype=np.int64)  # position * den, exact
    out = np.full((num_frames, 2), offset, dtype=np.int64)
    out[:, axis] = (2 * num + den) // (2 * den)
    return out


def render_clip(digit: np.ndarray, positions: np.ndarray, canvas: int) -> np.ndarray:
    """uint8 digit [d, d] pasted with its top-left at each (y, x) of positions [T, 2] on a black
    canvas -> [T, S, S]; the parts outside the canvas are cut off."""
    d = digit.shape[0]
    # Paste on a canvas padded by d on every side (any position in [-d, S] fits), then crop.
    frames = np.zeros((len(positions), canvas + 2 * d, canvas + 2 * d), np.uint8)
    for t, (y, x) in enumerate(positions):
        if -d < y < canvas and -d < x < canvas:
            frames[t, y + d:y + 2 * d, x + d:x + 2 * d] = digit
    return frames[:, d:d + canvas, d:d + canvas]


def moving_digit_classes(digit_groups: int = 2) -> tuple[str, ...]:
    """Class names; label = group * 4 + direction index (groups split 0..9 into equal runs)."""
    groups = [[d for d in range(10) if d * digit_groups // 10 == g] for g in range(digit_groups)]
    return tuple(f"{members[0]}-{members[-1]} {direction}" for members in groups for direction in DIRECTIONS)


def make_moving_digits(num_clips: int, pool: tuple[np.ndarray, np.ndarray], *, canvas: int,
                       num_frames: int, seed: int | tuple[int, ...], travel: int | None = None,
                       digit_groups: int = 2) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(clips uint8 [N, T, S, S], labels int32 [N], per-clip metadata) from digit images `pool`.

    Labels are balanced (a seeded permutation of 0..C-1 repeated). Each clip: a random digit of
    its group; along the motion axis the digit's top-left moves between `start` in
    [lo, lo + travel/4] and `end` in [hi - travel/4, hi], hi = lo + travel (default S/2), centred
    on the canvas (lo = (S - d)/2 - travel/2; a near-canvas-sized digit, as the checkpoint was
    trained on, is partly cut off at the ends of its path); across it a random `offset` within
    travel/4 of the centre."""
    images, digit_labels = pool
    d = images.shape[1]
    travel = canvas // 2 if travel is None else travel
    if not 2 <= travel <= canvas:
        raise DataError(f"--travel {travel}: the digit must move between 2 and {canvas} px (the canvas)")
    if num_frames < 2:
        raise DataError(f"--num-frames {num_frames}: motion needs at least 2 frames")
    if not 1 <= digit_groups <= 10:
        raise DataError(f"--digit-groups {digit_groups}: use 1..10")
    rng = np.random.default_rng(seed)  # an int or a tuple (e.g. (seed, split)) seeds it
    num_classes = 4 * digit_groups
    labels = rng.permutation(np.arange(num_clips) % num_classes).astype(np.int32)
    groups = digit_labels * digit_groups // 10
    members = [np.flatnonzero(groups == g) for g in range(digit_groups)]
    choice = np.array([rng.choice(members[g]) for g in labels // 4], dtype=np.int64)
    centre = (canvas - d) // 2
    lo, slack = centre - travel // 2, travel // 4
    starts = lo + rng.integers(0, slack + 1, num_clips)
    ends = lo + travel - rng.integers(0, slack + 1, num_clips)
    offsets = centre + rng.integers(-slack, slack + 1, num_clips)
    clips = np.stack([
        render_clip(images[k], trajectory(DIRECTIONS[lab % 4], s, e, o, num_frames), canvas)
        for k, lab, s, e, o in zip(choice, labels, starts, ends, offsets, strict=True)
    ]) if num_clips else np.zeros((0, num_frames, canvas, canvas), np.uint8)
    meta = {"digit": digit_labels[choice].astype(np.int64), "image_index": choice,
            "direction": labels % 4, "start": starts, "end": ends, "offset": offsets}
    return clips, labels, meta


def load_moving_digits(image_size: int, in_channels: int = 1, *, num_frames: int = 8,
                       num_train: int = 1024, num_val: int = 512, seed: int = 0,
                       digit_size: int | None = None, travel: int | None = None,
                       digit_groups: int = 2) -> ClipDataset:
    """The generated dataset at `image_size` (the canvas), digits of `digit_size` (default 7/8 of
    it, near the scale digits-trained checkpoints saw); gray replicated to `in_channels`."""
    digit_size = digit_size or max(1, round(image_size * 7 / 8))
    if not 0 < digit_size <= image_size or num_train < 1 or num_val < 1:
        raise DataError(f"digit size {digit_size} on a {image_size}px canvas, {num_train} train / "
                        f"{num_val} val clips: use 1 <= --digit-size <= the image size and positive "
                        "--num-train / --num-val")
    splits = []
    for k, (n, split) in enumerate(((num_train, "train"), (num_val, "val"))):
        pool = digit_glyphs(split, digit_size)
        clips, labels, _ = make_moving_digits(n, pool, canvas=image_size, num_frames=num_frames,
                                              seed=(seed, k), travel=travel, digit_groups=digit_groups)
        splits.append(ClipSplit(labels, clips=np.repeat(clips[..., None], in_channels, axis=-1)))
    return ClipDataset("synthetic", moving_digit_classes(digit_groups), image_size, in_channels,
                       num_frames, splits[0], splits[1])


# ----------------------------------------------------------------------------- users' clips
def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def count_frames(source: str | Path, in_channels: int) -> int:
    """Frames a clip source holds (frame images in a folder, frames of a file, .npy length); a .npy
    must be uint8 [T, H, W, C] with the checkpoint's C."""
    path = Path(source)
    if path.is_dir():
        return len(_frame_files(path))
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read clip {str(path)!r} ({e}): save it with np.save as a uint8 "
                            "array [T, H, W, C]") from e
        if arr.ndim != 4 or arr.dtype != np.uint8:
            raise DataError(f"clip {str(path)!r} is a {arr.dtype} array of shape {arr.shape}: save a "
                            "uint8 array [T, H, W, C]")
        if arr.shape[-1] != in_channels:
            raise DataError(f"clip {str(path)!r} has {arr.shape[-1]} channel(s) but the checkpoint takes "
                            f"{in_channels}: save [T, H, W, {in_channels}] frames (or use a checkpoint "
                            f"trained on {arr.shape[-1]}-channel images)")
        return int(arr.shape[0])
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


def _to_frame(im: Image.Image, size: int, in_channels: int) -> np.ndarray:
    """PIL frame -> uint8 [S, S, C]: converted, shorter side resized to S, centre crop."""
    if im.mode == "P":  # palette (GIF frames), maybe with transparency: through RGBA, as PIL advises
        im = im.convert("RGBA")
    im = im.convert("L" if in_channels == 1 else "RGB")
    w, h = im.size
    nw, nh = (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    out = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return out.reshape(size, size, in_channels)


def decode_clip(source: str | Path, num_available: int, image_size: int, in_channels: int,
                num_frames: int) -> np.ndarray:
    """The T uniformly sampled frames of one clip, uint8 [T, S, S, C]."""
    path = Path(source)
    idx = sample_frame_indices(num_available, num_frames)
    try:
        if path.is_dir():
            files = _frame_files(path)
            cache = {}
            for i in np.unique(idx):
                with Image.open(files[i]) as im:
                    cache[i] = _to_frame(im, image_size, in_channels)
            return np.stack([cache[i] for i in idx])
        if path.suffix.lower() == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)  # only sampled frames are read
            frames = [np.array(arr[i]) for i in idx]  # [H, W, C], C checked by the scan
            return np.stack([_to_frame(Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f),
                                       image_size, in_channels) for f in frames])
        with Image.open(path) as im:
            frames = [(f.copy(), int(f.info.get("duration") or 0)) for f in ImageSequence.Iterator(im)]
        durations = [t for _, t in frames]
        if min(durations) > 0 and len(set(durations)) > 1:  # variable frame times: sample in time
            idx = sample_frame_times(durations, num_frames)
        return np.stack([_to_frame(frames[i][0], image_size, in_channels) for i in idx])
    except (OSError, SyntaxError, ValueError, KeyError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode clip {str(path)!r} ({type(e).__name__}: {e}): re-encode or "
                        "remove it") from e


def _scan_clips(root: Path, what: str, in_channels: int
                ) -> tuple[tuple[str, ...], list[str], list[int], np.ndarray]:
    """(class names, clip sources, their frame counts, labels) of DIR/<class>/<clip>."""
    if not root.is_dir():
        raise DataError(f"{what} {str(root)!r} is not a folder: pass a folder with one sub-folder per "
                        "class holding clips, or 'synthetic' for the generated moving digits")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{what} {str(root)!r} has {len(classes)} class sub-folder(s) {classes}: a "
                        "classifier needs at least 2, <folder>/<class>/<clip>")
    sources: list[str] = []
    counts: list[int] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        clips = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (
            p.is_dir() or (p.is_file() and p.suffix.lower() in CLIP_FILE_EXTENSIONS)))
        if not clips:
            raise DataError(f"class folder {str(folder)!r} holds no clips: add frame folders, GIF/"
                            "multi-frame images or uint8 .npy arrays [T, H, W, C], or remove it")
        for clip in clips:
            n = count_frames(clip, in_channels)
            if n == 0:
                raise DataError(f"clip {str(clip)!r} has no readable frames: add frame images "
                                f"({', '.join(IMAGE_EXTENSIONS)}) / re-encode it, or remove it")
            sources.append(str(clip))
            counts.append(n)
            labels.append(label)
    return tuple(classes), sources, counts, np.asarray(labels, np.int32)


def load_clip_folder(path: str | Path, image_size: int, in_channels: int, *, num_frames: int = 8,
                     val_fraction: float = 0.2, seed: int = 0) -> ClipDataset:
    """DIR/train + DIR/val if both exist, else DIR split per class (data.py's stratified split)."""
    root = Path(path)
    if image_size <= 0 or num_frames <= 0:
        raise DataError(f"image size {image_size}, {num_frames} frames: both must be positive")
    if in_channels not in (1, 3):
        raise DataError(f"the checkpoint takes {in_channels}-channel images: clip folders give 1 "
                        "(luma) or 3 (RGB) channels; use such a checkpoint")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, src, cnt, lab = _scan_clips(root / "train", "train folder", in_channels)
        val_classes, vsrc, vcnt, vlab = _scan_clips(root / "val", "val folder", in_channels)
        if val_classes != classes:
            raise DataError(f"{str(root / 'val')!r} has classes {list(val_classes)} but "
                            f"{str(root / 'train')!r} has {list(classes)}: give both the same class "
                            "sub-folders")
        train = ClipSplit(lab, sources=tuple(src), frame_counts=tuple(cnt))
        val = ClipSplit(vlab, sources=tuple(vsrc), frame_counts=tuple(vcnt))
    else:
        classes, src, cnt, lab = _scan_clips(root, "clip folder", in_channels)
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction {val_fraction} is not in (0, 1): use e.g. 0.2, or give "
                            "DIR/train and DIR/val folders")
        tr, va = _stratified_split(lab, classes, val_fraction, seed)
        if len(va) == 0:
            raise DataError(f"--val-fraction {val_fraction} holds out no clip of {str(root)!r}: raise "
                            "it, add clips, or give DIR/train and DIR/val folders")
        train, val = (ClipSplit(lab[ix], sources=tuple(src[i] for i in ix),
                                frame_counts=tuple(cnt[i] for i in ix)) for ix in (tr, va))
    return ClipDataset(str(path), classes, image_size, in_channels, num_frames, train, val)


# ----------------------------------------------------------------------------- frozen features
def clip_features(fn: Callable[[np.ndarray], Any], data: ClipDataset, split: str, frame_batch: int = 256,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features of every frame of every clip of a split, [N, T, D] or [N, T, P, D], and labels."""
    T, S, C = data.num_frames, data.image_size, data.in_channels
    per_batch = max(1, frame_batch // T)
    feats, labels = [], []
    total = len(data.split(split))
    with tqdm(total=total, desc=f"{split} features", unit="clip", disable=not progress, leave=False) as bar:
        for clips, lab in data.batches(split, per_batch):
            out = apply_batched(fn, clips.reshape(-1, S, S, C), per_batch * T, prepare=normalise,
                                dtype=np.float32)  # the last batch padded to the one compiled shape
            feats.append(out.reshape(len(clips), T, *out.shape[1:]))
            labels.append(lab)
            bar.update(len(clips))
    return np.concatenate(feats), np.concatenate(labels).astype(np.int32)

