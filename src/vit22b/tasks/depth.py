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
import json
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit22b.data import DataError
from vit22b.tasks.dense_data import add_dense_args, load_dense_data
from vit22b.tasks.dense_heads import depth_loss, depth_metrics, train_head, write_dense_results
from vit22b.tasks.probe import load_backbone


def cmd_depth(args: argparse.Namespace) -> int:
    t0 = time.time()
    model = load_backbone(args.checkpoint, args.image_size)
    data = load_dense_data(args, "depth", model)
    y_tr, y_val = data.train_targets, data.val_targets
    if not (y_tr > 0).any() or not (y_val > 0).any():
        raise DataError(f"{data.name}: the {'train' if not (y_tr > 0).any() else 'val'} depth maps have no "
                        "valid (> 0) pixel: store depth in metres with 0 only where it is unknown")
    offset = float(np.mean(np.log(y_tr[y_tr > 0])))  # the decoder starts at the train mean log-depth
    decoder, pred, info = train_head(
        args, model, data.train_images, y_tr, data.val_images, 1,
        lambda out, y: depth_loss(out[..., 0] + offset, y, args.loss),
        lambda out: jnp.exp(jnp.clip(out[..., 0] + offset, -20.0, 20.0)), "depth")
    metrics = depth_metrics(pred, y_val)
    mean = float(np.mean(y_tr[y_tr > 0]))
    valid = (y_tr > 0).sum(0)
    per_pixel = np.where(valid > 0, y_tr.sum(0) / np.maximum(valid, 1), mean)  # [S, S], the geometry prior
    baseline_mean = depth_metrics(np.full_like(y_val, mean), y_val)
    baseline_map = depth_metrics(np.broadcast_to(per_pixel, y_val.shape), y_val)
    losses = info["losses"]
    results: dict[str, Any] = {
        "task": "depth", "checkpoint": str(args.checkpoint), "data": data.name,
        "image_size": data.image_size, "patch_size": model.cfg.patch_size, "grid_size": model.cfg.grid_size,
        "decoder": args.decoder, "layers": info["layers"],
        "features": args.features if args.decoder == "dpt" else None, "loss": args.loss,
        "train_examples": len(data.train_images), "val_examples": len(data.val_images),
        "steps": args.steps, "batch_size": args.batch_size, "lr": info["lr"], "seed": args.seed,
        "first_train_loss": losses[0], "final_train_loss": float(np.mean(losses[-10:])),
        **{f"val_{k}": v for k, v in metrics.items()},
        "baseline_train_mean": {"predict": f"{mean:.3f} m everywhere", **baseline_mean},
        "baseline_train_mean_per_pixel": {"predict": "train mean depth at each pixel location",
                                          **baseline_map},
    }
    results["seconds"] = round(time.time() - t0, 2)
    out = write_dense_results(results, args, "depth", decoder, info["stats"])
    print(f"depth ({args.decoder} on {','.join(map(str, info['layers']))}, {data.image_size} px, "
          f"{args.loss}): val AbsRel {metrics['abs_rel']:.4f}, delta<1.25 {100 * metrics['delta1']:.2f}%, "
          f"RMSE {metrics['rmse']:.3f} on {metrics['valid_pixels']} px of {len(data.val_images)} images "
          f"(baselines AbsRel/delta1: mean {baseline_mean['abs_rel']:.4f}/"
          f"{100 * baseline_mean['delta1']:.1f}%, per-pixel mean {baseline_map['abs_rel']:.4f}/"
          f"{100 * baseline_map['delta1']:.1f}%); "
          f"{args.steps} steps, {results['seconds']:.0f} s -> {out}")
    print(json.dumps(results, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("depth", help="monocular depth head on frozen tokens; AbsRel, delta<1.25")
    add_dense_args(p, "depth")
    p.add_argument("--loss", choices=["l1log", "silog"], default="l1log",
                   help="l1log: mean |log d - log d*|; silog: Eigen's scale-invariant log loss (0.85)")
    p.set_defaults(func=cmd_depth)
