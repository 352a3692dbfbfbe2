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
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit22b.tasks.dense_data import IGNORE, DenseData
from vit22b.tasks.dense_heads import (
    LossFn,
    PostFn,
    add_dense_args,
    cmd_dense,
    confusion_matrix,
    segment_loss,
    segmentation_scores,
)


def _head(data: DenseData) -> tuple[int, LossFn, PostFn]:
    return data.num_classes, segment_loss, lambda logits: jnp.argmax(logits, -1).astype(jnp.uint8)


def _evaluate(data: DenseData, pred: np.ndarray) -> tuple[dict[str, Any], str]:
    k, y_tr, y_val = data.num_classes, data.train_targets, data.val_targets
    scores = segmentation_scores(confusion_matrix(pred, y_val, k))
    majority = int(np.argmax(np.bincount(y_tr[y_tr != IGNORE].ravel(), minlength=k)))
    baseline = segmentation_scores(confusion_matrix(np.full_like(y_val, majority), y_val, k))
    metrics = {"num_classes": k, "val_miou": scores["miou"], "val_pixel_accuracy": scores["pixel_accuracy"],
               "val_per_class_iou": scores["per_class_iou"], "classes_counted": scores["classes_counted"],
               "baseline": {"predict": f"class {majority} (most frequent in train) everywhere",
                            "val_miou": baseline["miou"], "val_pixel_accuracy": baseline["pixel_accuracy"]}}
    return metrics, (f"{k} classes: val mIoU {100 * scores['miou']:.2f}%, pixel acc "
                     f"{100 * scores['pixel_accuracy']:.2f}% on {len(y_val)} images (baseline mIoU "
                     f"{100 * baseline['miou']:.2f}%)")


def cmd_segment(args: argparse.Namespace) -> int:
    return cmd_dense(args, "segment", _head, _evaluate)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("segment", help="semantic segmentation head on frozen tokens; val mIoU")
    add_dense_args(p, "segment")
    p.add_argument("--num-classes", type=int, default=None,
                   help="folder data: class count (default: largest mask id != 255, plus 1)")
    p.set_defaults(func=cmd_segment)
