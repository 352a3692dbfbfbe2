"""`vit22b probe`: a linear probe on frozen features.

Protocol: features of every train and val example are extracted once (no augmentation, the
model's eval preprocessing) by name from the model's intermediates: `pre_logits` (the pooled
representation), or `<name>-mean`, the mean over tokens of a token intermediate (`encoded-mean`,
`block_i-mean`, `stem-mean`). They are standardised with the *train* mean and std, then a linear
softmax classifier `logits = x W + b` is trained full-batch by Adam (`common.fit_head`: cosine
decay, no warm-up) for `--steps` steps on mean softmax cross-entropy + `wd/2 * ||W||^2` (the bias is
not decayed). Top-1 on val is reported.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit22b.tasks import common


def train_linear(x: np.ndarray, y: np.ndarray, num_classes: int, *, wd: float = 1e-4, steps: int = 500,
                 lr: float = 0.05, progress: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Full-batch Adam on mean softmax CE + wd/2 ||W||^2 -> (W [D, C], b [C], final loss)."""
    data = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

    def loss_fn(p: dict[str, jax.Array], data: tuple[jax.Array, jax.Array], _: Any) -> jax.Array:
        x, y = data
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
        return ce + 0.5 * wd * jnp.sum(p["w"] ** 2)  # an L2 term (Adam), not decoupled decay

    params, _ = common.fit_head(loss_fn, params, data=data, steps=steps, lr=lr, warmup=0, progress=progress,
                                desc="probe")
    return np.asarray(params["w"]), np.asarray(params["b"]), float(loss_fn(params, data, None))


def accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def per_class_accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray,
                       class_names: tuple[str, ...]) -> dict[str, float | None]:
    """{class name: accuracy on that class's images} (None: none in the split); shows which classes
    transfer, e.g. those a backbone never saw in pretraining."""
    right = np.argmax(x @ w + b, axis=1) == y
    return {name: float(right[y == c].mean()) if np.any(y == c) else None
            for c, name in enumerate(class_names)}


def cmd_probe(args: argparse.Namespace) -> int:
    model, dataset, adaptation = common.load_task(checkpoint=args.checkpoint, data=args.data,
                                                  image_size=args.image_size, val_data=args.val_data,
                                                  val_fraction=args.val_fraction)
    fn = common.batch_fn(model, args.feature)
    progress = not args.no_progress
    x_tr, y_tr = common.run_batches(fn, dataset, "train", args.batch_size, progress, f"{args.feature} train")
    x_val, y_val = common.run_batches(fn, dataset, "val", args.batch_size, progress, f"{args.feature} val")
    (x_tr, x_val), _ = common.standardise(x_tr, x_val)
    w, b, loss = train_linear(x_tr, y_tr, dataset.num_classes, wd=args.wd, steps=args.steps, lr=args.lr,
                              progress=progress)
    results = {"task": "probe", "checkpoint": str(args.checkpoint), "data": dataset.name,
               "image_size": dataset.image_size, "feature": args.feature, "feature_dim": int(x_tr.shape[1]),
               "train_examples": len(y_tr), "val_examples": len(y_val), "steps": args.steps,
               "wd": args.wd, "lr": args.lr, "final_train_loss": loss,
               "train_accuracy": accuracy(x_tr, y_tr, w, b), "val_accuracy": accuracy(x_val, y_val, w, b),
               "val_accuracy_per_class": per_class_accuracy(x_val, y_val, w, b, dataset.class_names),
               "chance": 1.0 / dataset.num_classes, "channel_adaptation": adaptation}
    return common.finish(results, common.results_path("probe", checkpoint=args.checkpoint, out=args.out),
                         f"linear probe on {args.feature} ({x_tr.shape[1]}-d): val top-1 "
                         f"{100 * results['val_accuracy']:.2f}% on {len(y_val)} images (train "
                         f"{100 * results['train_accuracy']:.2f}%, chance {100 / dataset.num_classes:.1f}%)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("probe", help="linear probe on frozen features; val top-1")
    common.add_common_args(p)
    p.add_argument("--feature", default="pre_logits",
                   help="pre_logits | encoded-mean | block_i-mean (mean over tokens)")
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=0.05, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--wd", type=float, default=1e-4, help="L2 on W: loss += wd/2 ||W||^2")
    p.set_defaults(func=cmd_probe)
