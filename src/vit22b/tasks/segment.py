"""`vit22b segment`: semantic segmentation with a decoder on frozen patch tokens; val mIoU.

Protocol (the ViT-22B paper's frozen-backbone segmentation, with Segmenter's linear decoder or a
multi-layer conv decoder; see dense_heads.py for the decoders, loss and metric definitions): tokens of
every train and val image are computed once at --image-size (the learned posemb resampled in 2-D), a
`linear` or `dpt` decoder is trained on per-pixel softmax cross-entropy (label 255 ignored), and val
mIoU (confusion matrix over the whole val set) and pixel accuracy are reported, with the mIoU of
predicting the most frequent train class everywhere as the baseline a head must beat.

    vit22b segment --checkpoint workdirs/digits --image-size 32 --decoder dpt

Default data: generated digit canvases (dense_data.digit_canvases; 11 classes, 0 = background, digit d
-> d + 1). `--data DIR` reads DIR/images/*.png|jpg with DIR/masks/<stem>.png (see dense_data.py).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit22b.tasks.dense_data import add_dense_args, load_dense_data
from vit22b.tasks.dense_heads import (
    confusion_matrix,
    segment_loss,
    segmentation_scores,
    train_head,
    write_dense_results,
)
from vit22b.tasks.probe import load_backbone


def cmd_segment(args: argparse.Namespace) -> int:
    t0 = time.time()
    model = load_backbone(args.checkpoint, args.image_size)
    data = load_dense_data(args, "segment", model)
    k = data.num_classes
    decoder, pred, info = train_head(args, model, data.train_images, data.train_targets, data.val_images,
                                     k, segment_loss, lambda logits: jnp.argmax(logits, -1).astype(jnp.uint8),
                                     "segment")
    scores = segmentation_scores(confusion_matrix(pred, data.val_targets, k))
    counts = np.bincount(data.train_targets[data.train_targets != 255].ravel(), minlength=k)
    majority = int(np.argmax(counts))
    baseline = segmentation_scores(confusion_matrix(np.full_like(data.val_targets, majority),
                                                    data.val_targets, k))
    losses = info["losses"]
    results: dict[str, Any] = {
        "task": "segment", "checkpoint": str(args.checkpoint), "data": data.name,
        "image_size": data.image_size, "patch_size": model.cfg.patch_size, "grid_size": model.cfg.grid_size,
        "num_classes": k, "decoder": args.decoder, "layers": info["layers"],
        "features": args.features if args.decoder == "dpt" else None,
        "train_examples": len(data.train_images), "val_examples": len(data.val_images),
        "steps": args.steps, "batch_size": args.batch_size, "lr": info["lr"], "seed": args.seed,
        "first_train_loss": losses[0], "final_train_loss": float(np.mean(losses[-10:])),
        "val_miou": scores["miou"], "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_per_class_iou": scores["per_class_iou"], "classes_counted": scores["classes_counted"],
        "baseline": {"predict": f"class {majority} (most frequent in train) everywhere",
                     "val_miou": baseline["miou"], "val_pixel_accuracy": baseline["pixel_accuracy"]},
    }
    results["seconds"] = round(time.time() - t0, 2)
    out = write_dense_results(results, args, "segment", decoder, info["stats"])
    print(f"segment ({args.decoder} on {','.join(map(str, info['layers']))}, {data.image_size} px, {k} "
          f"classes): val mIoU {100 * scores['miou']:.2f}%, pixel acc {100 * scores['pixel_accuracy']:.2f}% "
          f"on {len(data.val_images)} images (baseline mIoU {100 * baseline['miou']:.2f}%); train loss "
          f"{losses[0]:.3f} -> {results['final_train_loss']:.3f} in {args.steps} steps, "
          f"{results['seconds']:.0f} s -> {out}")
    print(json.dumps(results, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("segment", help="semantic segmentation head on frozen tokens; val mIoU")
    add_dense_args(p, "segment")
    p.add_argument("--num-classes", type=int, default=None,
                   help="folder data: class count (default: largest mask id != 255, plus 1)")
    p.set_defaults(func=cmd_segment)
