"""Position embeddings: fixed 2-D sin-cos, and 2-D resampling of learned 1-D embeddings.

A learned posemb is stored as [1, grid*grid, D] (1-D over tokens) but the tokens come from a
2-D grid of patches, so loading weights at another resolution resamples it on that grid.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

ResampleMethod = Literal["bv_linear", "linear", "cubic"]


def sincos2d(grid: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """MoCo-v3 style fixed embedding, [1, grid*grid, width]; width must divide by 4."""
    if width % 4:
        raise ValueError(f"sincos2d needs a width divisible by 4 (sin/cos of x and y), got {width}")
    y, x = jnp.mgrid[:grid, :grid]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1 or 1))
    y = jnp.einsum("n,d->nd", y.ravel(), omega)
    x = jnp.einsum("n,d->nd", x.ravel(), omega)
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return pe[None].astype(jnp.float32)


def resample_posemb(posemb: np.ndarray, new_grid: int, method: ResampleMethod = "bv_linear"
                    ) -> np.ndarray:
    """Resample a [1, g*g, D] embedding to [1, new_grid**2, D] on its 2-D grid.

    `bv_linear` is big_vision's (and scenic's) choice: `scipy.ndimage.zoom(order=1)`, which maps
    the corner patches onto each other. `linear`/`cubic` are half-pixel-centred
    (`jax.image.resize`, antialiased when shrinking), closer to timm's `F.interpolate`; the two
    families give different numbers, so the choice is explicit.
    """
    posemb = np.asarray(posemb, np.float32)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"expected a [1, tokens, width] position embedding, got {posemb.shape}")
    n, width = posemb.shape[1], posemb.shape[2]
    old_grid = int(round(np.sqrt(n)))
    if old_grid * old_grid != n:
        raise ValueError(f"position embedding has {n} tokens, not a square grid: cannot resample")
    if old_grid == new_grid:
        return posemb
    grid = posemb.reshape(old_grid, old_grid, width)
    if method == "bv_linear":
        zoom = (new_grid / old_grid, new_grid / old_grid, 1)
        out = scipy.ndimage.zoom(grid, zoom, order=1)
    elif method in ("linear", "cubic"):
        out = np.asarray(jax.image.resize(grid, (new_grid, new_grid, width), method=method))
    else:
        raise ValueError(f"unknown resample method {method!r}: use bv_linear, linear or cubic")
    return out.reshape(1, new_grid * new_grid, width).astype(np.float32)
