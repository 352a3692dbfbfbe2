"""`vit22b depth`: monocular depth with a decoder on frozen patch tokens; AbsRel, delta<1.25, RMSE.

Protocol (the ViT-22B paper's frozen-backbone depth evaluation with a DPT decoder; see dense_heads.py
for the decoders, losses and metric definitions): tokens of every train and val image are computed
once at --image-size, the decoder predicts log-depth per pixel (offset by the train mean log-depth) and
is trained on `--loss l1log` (mean |log d - log d*|, the default) or `silog` over valid pixels (d* > 0);
val AbsRel, RMSE and delta<1.25^k are reported over all valid val pixels, next to two trivial baselines:
the train mean depth everywhere, and the train mean depth *per pixel location* (the geometry prior of
a fixed camera, which a head must beat to show it reads the image).

    vit22b depth --checkpoint workdirs/digits --image-size 32

Default data: generated ground-plane scenes with exact depth (dense_data.depth_scenes). `--data DIR`
reads DIR/images/* with DIR/depth/<stem>.npy (float32 m, 0 = invalid) or 16-bit PNG (mm).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit22b.data import DataError
from vit22b.tasks.dense_data import DenseData
from vit22b.tasks.dense_heads import LossFn, PostFn, add_dense_args, cmd_dense, depth_loss, depth_metrics


def _head(data: DenseData, loss: str) -> tuple[int, LossFn, PostFn]:
    y_tr, y_val = data.train_targets, data.val_targets
    if not (y_tr > 0).any() or not (y_val > 0).any():
        raise DataError(f"{data.name}: the {'train' if not (y_tr > 0).any() else 'val'} depth maps have no "
                        "valid (> 0) pixel: store depth in metres with 0 only where it is unknown")
    offset = float(np.mean(np.log(y_tr[y_tr > 0])))  # the decoder starts at the train mean log-depth
    return (1, lambda out, y: depth_loss(out[..., 0] + offset, y, loss),
            lambda out: jnp.exp(jnp.clip(out[..., 0] + offset, -20.0, 20.0)))


def _evaluate(data: DenseData, pred: np.ndarray, loss: str) -> tuple[dict[str, Any], str]:
    y_tr, y_val = data.train_targets, data.val_targets
    metrics = depth_metrics(pred, y_val)
    mean = float(np.mean(y_tr[y_tr > 0]))
    valid = (y_tr > 0).sum(0)
    per_pixel = np.where(valid > 0, y_tr.sum(0) / np.maximum(valid, 1), mean)  # [S, S], the geometry prior
    by_mean = depth_metrics(np.full_like(y_val, mean), y_val)
    by_map = depth_metrics(np.broadcast_to(per_pixel, y_val.shape), y_val)
    results = {"loss": loss, **{f"val_{k}": v for k, v in metrics.items()},
               "baseline_train_mean": {"predict": f"{mean:.3f} m everywhere", **by_mean},
               "baseline_train_mean_per_pixel": {"predict": "train mean depth at each pixel location",
                                                 **by_map}}
    return results, (f"{loss}: val AbsRel {metrics['abs_rel']:.4f}, delta<1.25 "
                     f"{100 * metrics['delta1']:.2f}%, RMSE {metrics['rmse']:.3f} on "
                     f"{metrics['valid_pixels']} px of {len(y_val)} images (baselines AbsRel/delta1: mean "
                     f"{by_mean['abs_rel']:.4f}/{100 * by_mean['delta1']:.1f}%, per-pixel mean "
                     f"{by_map['abs_rel']:.4f}/{100 * by_map['delta1']:.1f}%)")


def cmd_depth(args: argparse.Namespace) -> int:
    return cmd_dense(args, "depth", lambda data: _head(data, args.loss),
                     lambda data, pred: _evaluate(data, pred, args.loss))


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("depth", help="monocular depth head on frozen tokens; AbsRel, delta<1.25")
    add_dense_args(p, "depth")
    p.add_argument("--loss", choices=["l1log", "silog"], default="l1log",
                   help="l1log: mean |log d - log d*|; silog: Eigen's scale-invariant log loss (0.85)")
    p.set_defaults(func=cmd_depth)
