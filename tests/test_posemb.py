"""Position embeddings: 2-D resampling of learned embeddings and the fixed sin-cos table."""

import numpy as np
import pytest
import scipy.ndimage

from vit22b.config import ConfigError, preset
from vit22b.posemb import resample_posemb, sincos2d


def random_posemb(grid: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, grid * grid, width)).astype(np.float32)


@pytest.mark.parametrize("old, new", [(4, 7), (6, 3), (3, 12)])
def test_bv_linear_is_scipy_zoom_on_the_grid(old, new):
    pe = random_posemb(old, 5)
    out = resample_posemb(pe, new, "bv_linear")
    grid = pe[0].reshape(old, old, 5)
    want = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
    assert out.shape == (1, new * new, 5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0].reshape(new, new, 5), want, rtol=1e-6, atol=1e-6)


def test_bv_linear_is_align_corners_bilinear_in_row_major_order():
    """Independent of scipy: bilinear interpolation reproduces a function linear in (row, col)
    exactly, and bv_linear maps corner patches onto each other (align corners). Rows and columns
    get different slopes, so a transposed token order shows."""
    old, new = 4, 10
    rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    pe = np.stack([3.0 * rows + 0.5 * cols, -rows + 2.0 * cols], axis=-1).reshape(1, old * old, 2)
    out = resample_posemb(pe.astype(np.float32), new, "bv_linear")[0]
    r, c = np.meshgrid(np.arange(new), np.arange(new), indexing="ij")
    r_src, c_src = r * (old - 1) / (new - 1), c * (old - 1) / (new - 1)
    want = np.stack([3.0 * r_src + 0.5 * c_src, -r_src + 2.0 * c_src], axis=-1).reshape(new * new, 2)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["bv_linear", "linear", "cubic"])
def test_identity_when_grid_unchanged(method):
    pe = random_posemb(5, 3)
    np.testing.assert_array_equal(resample_posemb(pe, 5, method), pe)


def test_bv_linear_preserves_corners_when_upsampling():
    old, new, width = 4, 9, 6
    pe = random_posemb(old, width)
    src = pe[0].reshape(old, old, width)
    out = resample_posemb(pe, new, "bv_linear")[0].reshape(new, new, width)
    for (i, j), (oi, oj) in zip([(0, 0), (0, old - 1), (old - 1, 0), (old - 1, old - 1)],
                                [(0, 0), (0, new - 1), (new - 1, 0), (new - 1, new - 1)], strict=True):
        np.testing.assert_allclose(out[oi, oj], src[i, j], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_half_pixel_methods_shape_and_constant(method):
    pe = np.full((1, 16, 3), 2.5, np.float32)
    out = resample_posemb(pe, 6, method)
    assert out.shape == (1, 36, 3)
    np.testing.assert_allclose(out, 2.5, rtol=1e-5)  # a constant stays constant
    down = resample_posemb(random_posemb(8, 3), 4, method)
    assert down.shape == (1, 16, 3) and np.isfinite(down).all()


def test_non_square_token_count_raises():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_posemb(np.zeros((1, 15, 4), np.float32), 4)


def test_bad_rank_and_method_raise():
    with pytest.raises(ValueError, match=r"\[1, tokens, width\]"):
        resample_posemb(np.zeros((16, 4), np.float32), 4)
    with pytest.raises(ValueError, match="unknown resample method"):
        resample_posemb(random_posemb(4, 2), 5, "nearest")  # type: ignore[arg-type]


def test_sincos2d_shape_and_values():
    grid, width = 5, 16
    pe = np.asarray(sincos2d(grid, width))
    assert pe.shape == (1, grid * grid, width)
    assert pe.dtype == np.float32
    assert np.all(np.abs(pe) <= 1.0 + 1e-6)
    q = width // 4
    for row in range(grid):
        for col in range(grid):
            tok = pe[0, row * grid + col]
            # sin^2 + cos^2 = 1 in each (x, y) pair; frequency 0 has omega = 1
            np.testing.assert_allclose(tok[:q] ** 2 + tok[q:2 * q] ** 2, 1.0, atol=1e-5)
            np.testing.assert_allclose(tok[0], np.sin(col), atol=1e-6)
            np.testing.assert_allclose(tok[2 * q], np.sin(row), atol=1e-6)
    # every token gets a distinct embedding
    assert len({tuple(np.round(t, 5)) for t in pe[0]}) == grid * grid


def test_sincos2d_needs_width_divisible_by_4_in_config():
    with pytest.raises(ConfigError, match="divisible by 4"):
        preset("mu/4", image_size=16, width=34, num_heads=2, mlp_dim=128, posemb="sincos2d")
    assert preset("mu/4", image_size=16, posemb="sincos2d").width == 32


def test_sincos2d_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError):
        sincos2d(4, 6)
