"""The input contract of `vit22b predict --input-npy` (and of the model itself).

The model was trained on images scaled to float32 in [-1, 1] (uint8 / 127.5 - 1), laid out
[N, S, S, C] (batch, height, width, channels). Accepted:
  - float arrays with every value in [-1, 1] (a hair of rounding slack allowed), used as they are;
  - uint8 arrays 0..255, scaled exactly as in training.
Anything else would give confident nonsense (a uint8 digit 3 cast without scaling comes out as 8),
so it is refused: other integer types, floats outside [-1, 1] (e.g. 0..255 images as float),
NaN/Inf values, and other layouts, with a hint naming the layout expected. (Floats in 0..1 fit the
range and cannot be told apart from [-1, 1] images: the contract, not a check, covers them.)
A model imported from elsewhere may expect another normalisation (timm's ImageNet mean/std):
`--any-float-range` lets finite floats of any range through, every other check stays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vit22b.data import DataError

RANGE_SLACK = 1e-3  # float inputs in [-1.001, 1.001]: rounding of an exact [-1, 1] scaling


def _layout_hint(shape: tuple[int, ...], size: int, channels: int) -> str:
    want = f"[batch, {size}, {size}, {channels}]"
    if len(shape) == 3 and shape == (size, size, channels):
        return f"one unbatched image {list(shape)}: expected {want}; add the batch axis (x[None])"
    if len(shape) == 4 and shape[1] == channels and shape[2:] == (size, size):
        return (f"shape {list(shape)} looks channels-first (NCHW): expected {want} (NHWC); "
                "transpose with x.transpose(0, 2, 3, 1)")
    if len(shape) == 4 and shape[1:3] == (size, size):
        return (f"shape {list(shape)} has {shape[3]} channel(s) but the model takes {channels}: "
                f"expected {want}")
    return (f"shape {list(shape)} is not {want} (batch, height, width, channels): resize the "
            f"images to {size}x{size} with {channels} channel(s)")


def model_inputs(x: np.ndarray, image_size: int, in_channels: int, source: str = "input", *,
                 float_range: bool = True) -> np.ndarray:
    """`x` checked against the contract above and returned as float32 in [-1, 1]; DataError otherwise.
    `float_range=False`: floats pass at any (finite) value, for a model that was imported with
    another input normalisation (timm's ImageNet mean/std spans about [-2.1, 2.6])."""
    if x.dtype.hasobject or x.dtype.fields is not None:
        raise DataError(f"{source}: dtype {x.dtype} is not an image array: pass float32 in [-1, 1] or "
                        "uint8 0..255, [batch, S, S, C]")
    if x.ndim != 4 or x.shape[1:] != (image_size, image_size, in_channels):
        raise DataError(f"{source}: {_layout_hint(tuple(x.shape), image_size, in_channels)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{source}: dtype {x.dtype} is neither float in [-1, 1] (as trained) nor uint8 "
                        "0..255 (scaled like training): cast 0..255 images with x.astype(np.uint8)")
    finite = np.isfinite(x)
    if not finite.all():
        raise DataError(f"{source}: {int(x.size - finite.sum())} NaN/Inf value(s): the model needs finite "
                        "images (float in [-1, 1] or uint8 0..255)")
    lo, hi = x.min(), x.max()
    limit = np.float32(1 + RANGE_SLACK)  # in float32, so a float32 1.001 is inside
    if float_range and (lo < -limit or hi > limit):
        raise DataError(f"{source}: float values span [{lo:g}, {hi:g}] but the model takes [-1, 1] (as "
                        "trained: uint8 / 127.5 - 1): rescale, or pass uint8 0..255 to be scaled (a "
                        "model imported with another normalisation: --any-float-range)")
    return x.astype(np.float32)


def load_input_npy(path: str | Path, image_size: int, in_channels: int, *,
                   float_range: bool = True) -> np.ndarray:
    """A `.npy` array under the contract above; pickled (object) arrays are never loaded."""
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: pass an .npy file of images [batch, S, S, C]") from None
    except (ValueError, OSError, EOFError) as e:  # object arrays, truncated or foreign files
        raise DataError(f"{path} is not a plain .npy array ({e}): save images with np.save (no "
                        "object arrays; pickles are never loaded)") from e
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise DataError(f"{path} is an .npz archive, not an .npy array: save one array with np.save")
    return model_inputs(x, image_size, in_channels, source=str(path), float_range=float_range)
