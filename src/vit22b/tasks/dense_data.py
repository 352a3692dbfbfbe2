"""Data for the dense tasks (`vit22b segment`, `vit22b depth`): generated scenes with exact labels,
or a user's folder of images with per-pixel masks / depth maps.

Generated data (no downloads; a pure function of (seed, split, size)):

- `digit_canvases`: scikit-learn's 8x8 digits, upsampled (bilinear, as `vit22b.data` does for the
  classification digits) to `digit_size` px and composited onto a black canvas of `size` px at random
  positions, 1..`max_digits` per canvas. Only *stroke* pixels (intensity > `threshold`) are drawn, and
  the mask is written from the very same boolean array: class 0 = background, digit d -> class d + 1.
  Later digits are drawn on top of earlier ones and the mask follows, so `mask > 0` is exactly
  `canvas > threshold` and replaying the returned placements reproduces both arrays. Train canvases use
  the digits of the classification train split, val canvases the held-out ones (no glyph is shared).
- `depth_scenes`: a pinhole camera (focal length = image size in px, so a ~53 degree field of view) at
  height h over a ground plane, plus fronto-parallel rectangles and discs standing on it, rendered by
  the painter's algorithm (far to near, so occlusion order is exact). Depth is the z-distance at each
  pixel centre: ground rows z = f h / (v - v_horizon), objects their constant z. Sky (and ground beyond
  `max_depth`) has no depth: 0 = invalid, as with LiDAR. Intensity carries the depth cues a monocular
  model can use: a world-space checkerboard / stripe texture (its image frequency grows with distance),
  atmospheric fog (contrast falls and brightness tends to the sky's with distance) and the objects'
  contact rows on the ground.

Folders (`--data DIR`): `DIR/images/*.png|jpg` with `DIR/masks/<stem>.png` (single-band uint8 class ids,
255 = ignore) for segmentation, or `DIR/depth/<stem>.npy` (float32 metres, 0 = invalid, read with
allow_pickle=False) / `<stem>.png` (16-bit, millimetres) for depth. Train/val are `DIR/train` and
`DIR/val` (each laid out as above) when both exist, else a seeded `--val-fraction` split. Images are
resized to image_size x image_size (bilinear; no crop, so the aspect ratio is not kept), targets with
nearest-neighbour so class ids and depth discontinuities are never blended.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from vit22b.data import DataError
from vit22b.tasks.common import digit_glyphs

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IGNORE = 255
_ONE_BAND = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclasses.dataclass(frozen=True)
class DenseData:
    """Images (uint8 [N, S, S, C]) with per-pixel targets: uint8 class ids [N, S, S] (255 = ignore) for
    segmentation, float32 metres [N, S, S] (0 = invalid) for depth."""

    name: str
    image_size: int
    in_channels: int
    train_images: np.ndarray
    train_targets: np.ndarray
    val_images: np.ndarray
    val_targets: np.ndarray
    num_classes: int = 0  # 0 for depth


# ----------------------------------------------------------------------------- segmentation
def digit_canvases(n: int, size: int, *, seed: int = 0, split: str = "train", digit_size: int | None = None,
                   max_digits: int = 3, threshold: int = 128, in_channels: int = 1
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 [n, S, S, C], masks uint8 [n, S, S], placements int64 [P, 4] = (canvas, glyph, y, x)
    in drawing order); see the module docstring. `digit_size` defaults to max(8, S // 2)."""
    s = digit_size or max(8, size // 2)
    if s > size:
        raise DataError(f"digit size {s} px does not fit a {size}-px canvas: use --image-size >= {s}")
    glyphs, labels = digit_glyphs(split, s)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    canvas = np.zeros((n, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    placements = []
    for i in range(n):
        for _ in range(int(rng.integers(1, max_digits + 1))):
            g = int(rng.integers(len(glyphs)))
            y, x = (int(v) for v in rng.integers(0, size - s + 1, 2))
            stroke = glyphs[g] > threshold  # the one array both the image and the mask are written from
            canvas[i, y:y + s, x:x + s][stroke] = glyphs[g][stroke]
            masks[i, y:y + s, x:x + s][stroke] = labels[g] + 1
            placements.append((i, g, y, x))
    images = np.repeat(canvas[..., None], in_channels, axis=-1)  # grey -> C identical channels
    return images, masks, np.asarray(placements, np.int64).reshape(-1, 4)


# ----------------------------------------------------------------------------- depth
def render_scene(size: int, rng: np.random.Generator, *, max_objects: int = 3, max_depth: float = 80.0,
                 fog: float = 30.0, sky: float = 0.9) -> tuple[np.ndarray, np.ndarray, dict]:
    """One scene -> (intensity float [S, S] in [0, 1], depth float32 [S, S] metres (0 = no depth), the
    scene's parameters: camera height h, horizon row v_h, focal f, objects (z, disc, width, height,
    lateral, brightness))."""
    f, cx = float(size), size / 2.0  # focal length (px) and principal point; square pixels
    h = rng.uniform(1.2, 2.0)  # camera height over the ground (m)
    v_h = rng.uniform(0.3, 0.45) * size  # horizon row: the camera pitch varies per scene
    vc = np.arange(size)[:, None] + 0.5  # pixel centres, rows [S, 1] and columns [1, S]
    uc = np.arange(size)[None, :] + 0.5
    depth = np.zeros((size, size))
    albedo = np.zeros((size, size))
    below = vc - v_h  # rows below the horizon see the ground at z = f h / (v - v_h)
    z_ground = np.where(below > 0, f * h / np.maximum(below, 1e-9), 2 * max_depth) * np.ones((1, size))
    ground = (below > 0) & (z_ground <= max_depth)
    tile = rng.uniform(0.5, 1.5)  # checkerboard square (m), in world coordinates (X, z)
    x_ground = (uc - cx) * z_ground / f
    checker = (np.floor(x_ground / tile) + np.floor(z_ground / tile)) % 2
    depth[ground] = z_ground[ground]
    albedo[ground] = (0.25 + 0.35 * checker)[ground]
    # (z, disc?, width, height, lateral position in [-1, 1] of the half view, brightness)
    objects = [(rng.uniform(2.0, 25.0), rng.random() < 0.5, rng.uniform(0.6, 2.5), rng.uniform(0.6, 2.5),
                rng.uniform(-0.9, 0.9), rng.uniform(0.55, 1.0))
               for _ in range(int(rng.integers(1, max_objects + 1)))]
    for z, disc, width, height, lateral, bright in sorted(objects, key=lambda o: -o[0]):  # far -> near
        x_o = lateral * cx / f * z  # keep the centre inside the view
        xw = (uc - cx) * z / f  # world X and height above ground Y of each pixel's ray at depth z
        yw = h - (vc - v_h) * z / f
        if disc:  # radius width/2, resting on the ground
            r = width / 2
            cover = (xw - x_o) ** 2 + (yw - r) ** 2 <= r * r
        else:
            cover = (np.abs(xw - x_o) <= width / 2) & (yw >= 0) & (yw <= height)
        stripes = np.floor((xw - x_o) / 0.3) % 2  # 0.3 m vertical stripes
        depth = np.where(cover, z, depth)
        albedo = np.where(cover, bright * (0.45 + 0.4 * stripes), albedo)
    valid = depth > 0
    t = np.exp(-depth / fog)  # fog: transmittance along the ray
    intensity = np.where(valid, albedo * t + sky * (1 - t), sky)
    return intensity, depth.astype(np.float32), {"h": h, "v_h": v_h, "f": f, "objects": objects}


def depth_scenes(n: int, size: int, *, seed: int = 0, split: str = "train", in_channels: int = 1,
                 max_objects: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, S, S, C], depth float32 [n, S, S]); scene i of a split is f(seed, split, i)."""
    images = np.zeros((n, size, size), np.uint8)
    depth = np.zeros((n, size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        intensity, depth[i], _ = render_scene(size, rng, max_objects=max_objects)
        images[i] = np.round(255 * np.clip(intensity, 0, 1))
    return np.repeat(images[..., None], in_channels, axis=-1), depth


def synthetic(task: str, image_size: int, in_channels: int, num_train: int, num_val: int,
              seed: int) -> DenseData:
    """The generated train/val sets of `task` ('segment' or 'depth')."""
    if num_train < 1 or num_val < 1:
        raise DataError(f"--num-train {num_train} / --num-val {num_val}: use at least 1 each")
    if task == "segment":
        tr = digit_canvases(num_train, image_size, seed=seed, split="train", in_channels=in_channels)
        va = digit_canvases(num_val, image_size, seed=seed, split="val", in_channels=in_channels)
        return DenseData(f"synthetic digit canvases (seed {seed})", image_size, in_channels,
                         tr[0], tr[1], va[0], va[1], num_classes=11)
    tr = depth_scenes(num_train, image_size, seed=seed, split="train", in_channels=in_channels)
    va = depth_scenes(num_val, image_size, seed=seed, split="val", in_channels=in_channels)
    return DenseData(f"synthetic depth scenes (seed {seed})", image_size, in_channels, *tr, *va)


# ----------------------------------------------------------------------------- folders
def _read_image(path: Path, size: int, in_channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [S, S, C] and the original (width, height); the file's channels must match the model's."""
    try:
        with Image.open(path) as im:
            im.load()
            channels = 1 if im.mode in _ONE_BAND else 3
            if channels != in_channels:
                raise DataError(
                    f"image {str(path)!r} has {channels} channel(s) (mode {im.mode}) but the checkpoint "
                    f"takes {in_channels}: convert the images (e.g. PIL .convert("
                    f"{'L' if in_channels == 1 else 'RGB'!r})) or use a {channels}-channel checkpoint")
            original = im.size
            im = im.convert("L" if in_channels == 1 else "RGB")
            im = im.resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {str(path)!r} ({e}): pass a PNG/JPEG file") from e
    return np.asarray(im, np.uint8).reshape(size, size, in_channels), original


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im)  # palette ("P") masks give the palette indices, as VOC expects
    except (OSError, SyntaxError) as e:
        raise DataError(f"cannot read mask {str(path)!r} ({e}): save it as a single-band PNG") from e
    if mask.ndim != 2:
        raise DataError(f"mask {str(path)!r} has shape {mask.shape}: save class ids as a single-band "
                        "(mode L or P) PNG, one id per pixel, 255 = ignore")
    if mask.shape != shape:
        raise DataError(f"mask {str(path)!r} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{shape[1]}x{shape[0]} (width x height): masks must be the same size as their image")
    if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
        raise DataError(f"mask {str(path)!r} has values outside 0..255: store uint8 class ids")
    return mask.astype(np.uint8)


def _read_depth(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            depth = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                depth = np.asarray(im).astype(np.float64) / 1000.0  # 16-bit PNG in millimetres
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read depth {str(path)!r} ({e}): save float32 metres with np.save or a "
                        "16-bit PNG in millimetres") from e
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise DataError(f"depth {str(path)!r} has shape {depth.shape} dtype {depth.dtype}: use a 2-D "
                        "float array (metres, 0 = invalid)")
    if depth.shape != shape:
        raise DataError(f"depth {str(path)!r} is {depth.shape[1]}x{depth.shape[0]} but its image is "
                        f"{shape[1]}x{shape[0]} (width x height): depth maps must match their image")
    if not np.all(np.isfinite(depth)) or depth.min(initial=0) < 0:
        raise DataError(f"depth {str(path)!r} has NaN, inf or negative values: mark missing depth as 0")
    return depth.astype(np.float32)


def _pairs(root: Path, target_dir: str, exts: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(image, target) paths of root/images/* and root/<target_dir>/<stem>.<ext>, sorted by name."""
    images_dir, targets_dir = root / "images", root / target_dir
    for d in (images_dir, targets_dir):
        if not d.is_dir():
            raise DataError(f"{str(d)!r} is not a folder: lay the data out as {root}/images/<name>.png "
                            f"with {root}/{target_dir}/<name>{exts[0]} (or DIR/train and DIR/val, each so)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DataError(f"{str(images_dir)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    pairs = []
    for image in images:
        found = [p for p in (targets_dir / f"{image.stem}{e}" for e in exts) if p.exists()]
        if not found:
            what = "mask" if target_dir == "masks" else "depth map"
            raise DataError(f"image {str(image)!r} has no {what}: add "
                            f"{str(targets_dir / (image.stem + exts[0]))!r} or remove the image")
        pairs.append((image, found[0]))
    return pairs


def _load_pairs(pairs: list[tuple[Path, Path]], kind: str, size: int, in_channels: int
                ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Images, resized targets, and per file the largest class id != 255 *before* resizing (-1: none),
    so that a bad id is reported even where nearest-neighbour downsampling would drop it."""
    images, targets, top = [], [], []
    for image_path, target_path in pairs:
        image, (w, h) = _read_image(image_path, size, in_channels)
        target = (_read_mask if kind == "segment" else _read_depth)(target_path, (h, w))
        if kind == "segment":
            top.append(int(target[target != IGNORE].astype(np.int64).max(initial=-1)))
        images.append(image)
        mode = "L" if target.dtype == np.uint8 else "F"  # uint8 ids or float32 metres
        im = Image.fromarray(target.astype(np.uint8 if mode == "L" else np.float32), mode=mode)
        targets.append(np.asarray(im.resize((size, size), Image.Resampling.NEAREST)))
    return np.stack(images), np.stack(targets), top


def load_folder(path: str | Path, kind: str, image_size: int, in_channels: int, *, val_fraction: float = 0.2,
                seed: int = 0, num_classes: int | None = None) -> DenseData:
    """A user's segmentation (`kind='segment'`) or depth folder; see the module docstring for the layout.

    Segmentation: `num_classes` None infers max(id != 255) + 1; otherwise every id must be < num_classes
    or 255 (the error names the file and the value)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--data {str(path)!r} is not a folder: pass 'synthetic' or a folder with images/ "
                        f"and {'masks/' if kind == 'segment' else 'depth/'} (or train/ + val/ with them)")
    target_dir, exts = ("masks", (".png",)) if kind == "segment" else ("depth", (".npy", ".png"))
    if (root / "train").is_dir() and (root / "val").is_dir():
        tr_pairs, va_pairs = _pairs(root / "train", target_dir, exts), _pairs(root / "val", target_dir, exts)
    else:
        pairs = _pairs(root, target_dir, exts)
        n_val = round(val_fraction * len(pairs))
        if not 0 < n_val < len(pairs):
            raise DataError(f"--val-fraction {val_fraction} of {len(pairs)} images leaves {n_val} for "
                            "val: use a fraction that keeps at least one image in each split, or "
                            "DIR/train + DIR/val")
        order = np.random.default_rng(seed).permutation(len(pairs))
        va_pairs = [pairs[i] for i in sorted(order[:n_val])]
        tr_pairs = [pairs[i] for i in sorted(order[n_val:])]
    tr_images, tr_targets, tr_top = _load_pairs(tr_pairs, kind, image_size, in_channels)
    va_images, va_targets, va_top = _load_pairs(va_pairs, kind, image_size, in_channels)
    if kind == "segment":
        top = tr_top + va_top
        if num_classes is None:
            num_classes = max(top) + 1
        for (_, mask_path), value in zip(tr_pairs + va_pairs, top, strict=True):
            if value >= num_classes:
                raise DataError(f"mask {str(mask_path)!r} has class id {value} but there are {num_classes} "
                                f"classes (ids 0..{num_classes - 1}, 255 = ignore): fix the mask or raise "
                                "--num-classes")
        if num_classes < 2:
            raise DataError(f"the masks under {str(path)!r} hold {num_classes} class(es) besides 255: "
                            "segmentation needs at least 2 classes (e.g. background 0 and object 1)")
    return DenseData(str(path), image_size, in_channels, tr_images, tr_targets, va_images, va_targets,
                     num_classes=num_classes or 0)


def load_dense_data(task: str, data: str, *, image_size: int, in_channels: int, num_train: int = 1000,
                    num_val: int = 200, val_fraction: float = 0.2, seed: int = 0,
                    num_classes: int | None = None) -> DenseData:
    """`data` 'synthetic' (`num_train` / `num_val` generated images) or a folder, for `task`."""
    if data == "synthetic":
        return synthetic(task, image_size, in_channels, num_train, num_val, seed)
    return load_folder(data, task, image_size, in_channels, val_fraction=val_fraction, seed=seed,
                       num_classes=num_classes)
