"""`vit22b probe`: a linear probe on frozen features.

Protocol: features of every train and val example are extracted once (no augmentation, the
model's eval preprocessing) by name from the model's intermediates: `pre_logits` (the pooled
representation), or `<name>-mean`, the mean over tokens of a token intermediate (`encoded-mean`,
`block_i-mean`, `stem-mean`). They are standardised with the *train* mean and std, then a linear
softmax classifier `logits = x W + b` is trained full-batch by optax Adam for `--steps` steps on
mean softmax cross-entropy + `wd/2 * ||W||^2` (the bias is not decayed). Top-1 on val is reported.

The helpers here (checkpoint + data loading with clear errors, named feature extraction, result
writing) are shared by the other tasks.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from vit22b.config import ModelConfig
from vit22b.data import ImageDataset, load_dataset
from vit22b.model import ViT

TOKEN_FEATURES = ("stem", "with_posemb", "encoded")


# ----------------------------------------------------------------------------- shared helpers
def add_common_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --data, --val-data, --image-size, --batch-size, --out, --no-progress."""
    p.add_argument("--checkpoint", required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--data", default="digits", help="'digits', 'fashion-mnist', 'idx:DIR', a prepare-data "
                   "directory or an image folder (one sub-folder per class); channels are adapted to "
                   "the checkpoint's (gray <-> RGB)")
    p.add_argument("--val-data", default=None, help="held-out image folder (default: a split of --data)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the checkpoint's (another size resamples the position embedding)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("--out", default=None, help="results JSON (default CHECKPOINT/<task>.json)")
    p.add_argument("--no-progress", action="store_true")


def checkpoint_at(checkpoint: str | Path, image_size: int | None) -> tuple[ModelConfig, int]:
    """The checkpoint's config and the image size to run it at, checked (no weights loaded yet)."""
    from vit22b.weights import read_weights

    _, cfg = read_weights(checkpoint)
    if cfg is None:
        raise ValueError(f"{checkpoint} has no config.json: pass a model dir written by "
                         "`vit22b train` or `vit22b import-timm`")
    size = cfg.image_size if image_size is None else image_size
    if size <= 0 or size % cfg.patch_size:
        fix = max(1, round(size / cfg.patch_size)) * cfg.patch_size
        raise ValueError(f"--image-size {size} is not a positive multiple of the checkpoint's patch size "
                         f"{cfg.patch_size}: use e.g. {fix}")
    return cfg, size


def _load_at(checkpoint: str | Path, cfg: ModelConfig, size: int, in_channels: int | None = None) -> ViT:
    """The checkpoint at `size` (posemb resampled) for `in_channels` (patch kernel adapted, see
    weights.adapt_input_channels)."""
    from vit22b.api import load_model

    overrides: dict[str, Any] = {} if size == cfg.image_size else {"image_size": size}
    if in_channels is not None and in_channels != cfg.in_channels:
        overrides["in_channels"] = in_channels
    return load_model(checkpoint, **overrides)


def load_backbone(checkpoint: str | Path, image_size: int | None) -> ViT:
    """The checkpoint at `image_size` (posemb resampled in 2-D), with clear errors for a bad size."""
    cfg, size = checkpoint_at(checkpoint, image_size)
    return _load_at(checkpoint, cfg, size)


def load_task(args: argparse.Namespace) -> tuple[ViT, ImageDataset]:
    """The checkpoint (at --image-size, posemb resampled) and the dataset, checked against each other
    before the weights are loaded."""
    cfg, size = checkpoint_at(args.checkpoint, args.image_size)
    dataset = load_dataset(args.data, size, val_path=args.val_data, val_fraction=args.val_fraction)
    args.channel_adaptation = channel_adaptation(cfg.in_channels, dataset.in_channels)  # -> write_results
    return _load_at(args.checkpoint, cfg, size, dataset.in_channels), dataset


def channel_adaptation(checkpoint_channels: int, data_channels: int) -> str | None:
    """What loading does when the checkpoint and the data disagree on channels (reported in JSON)."""
    if checkpoint_channels == data_channels:
        return None
    if data_channels == 1:
        return (f"{checkpoint_channels}-channel patch kernel summed over channels "
                "(= gray images replicated to RGB)")
    return f"1-channel patch kernel repeated over {data_channels} channels and scaled 1/{data_channels}"


def available_features(model: ViT) -> list[str]:
    depth = model.cfg.depth
    blocks = ["block_0-mean"] + ([f"block_{depth - 1}-mean"] if depth > 1 else [])
    pooled = ["pre_logits"] if model.cfg.head != "none" else []
    return pooled + [f"{n}-mean" for n in TOKEN_FEATURES] + [" .. ".join(blocks) + " (block_i-mean)"]


def parse_feature(model: ViT, name: str) -> tuple[str, bool, tuple[int, ...]]:
    """'pre_logits' | '<token feature>-mean' | 'block_i-mean' -> (intermediate, mean over tokens,
    return_layers); a ValueError naming the available ones otherwise."""
    base, pooled = (name[:-5], True) if name.endswith("-mean") else (name, False)
    m = re.fullmatch(r"block_(\d+)", base)
    ok = pooled and (base in TOKEN_FEATURES or (m is not None and int(m.group(1)) < model.cfg.depth))
    ok = ok or (not pooled and base == "pre_logits" and model.cfg.head != "none")
    if not ok:
        raise ValueError(f"feature {name!r} is not one this model produces: use one of "
                         f"{', '.join(available_features(model))} (token features need '-mean'; "
                         f"the model has {model.cfg.depth} blocks, head {model.cfg.head!r})")
    return base, pooled, (int(m.group(1)),) if m else ()


def batch_fn(model: ViT, name: str) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images -> [B, D] function for a feature name (see `parse_feature`)."""
    from vit22b.features import feature_fn

    base, pooled, layers = parse_feature(model, name)
    forward = feature_fn(model, base, layers)
    return jax.jit(lambda x: jnp.mean(forward(x), axis=1)) if pooled else forward


def run_batches(fn: Callable[[np.ndarray], Any], dataset: ImageDataset, split: str, batch_size: int,
                progress: bool, desc: str,
                transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fn(images) over a split, labels) in order, padding dropped; `transform` edits each batch."""
    n = dataset.train_size if split == "train" else dataset.val_size
    outs, labels = [], []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in dataset.eval_batches(batch_size, split=split):
            images = batch["image"] if transform is None else transform(batch["image"])
            keep = batch["mask"]
            outs.append(np.asarray(fn(images), np.float32)[keep])
            labels.append(batch["label"][keep])
            bar.update(int(keep.sum()))
    return np.concatenate(outs), np.concatenate(labels)


def write_results(results: dict[str, Any], args: argparse.Namespace, task: str) -> Path:
    results.setdefault("channel_adaptation", getattr(args, "channel_adaptation", None))
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"{task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- the probe
def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Each array standardised with the train features' per-dimension mean and std (+1e-6)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def train_linear(x: np.ndarray, y: np.ndarray, num_classes: int, *, wd: float = 1e-4,
                 steps: int = 500, lr: float = 0.05) -> tuple[np.ndarray, np.ndarray, float]:
    """Full-batch Adam on mean softmax CE + wd/2 ||W||^2 -> (W [D, C], b [C], final loss)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))

    def loss_fn(p: dict[str, jax.Array]) -> jax.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
        return ce + 0.5 * wd * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(p: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
        def step(carry: Any, _: Any) -> tuple[Any, None]:
            p, s = carry
            grads = jax.grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p, loss_fn(p)

    params, loss = fit(params)
    return np.asarray(params["w"]), np.asarray(params["b"]), float(loss)


def accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def cmd_probe(args: argparse.Namespace) -> int:
    model, dataset = load_task(args)
    fn = batch_fn(model, args.feature)
    progress = not args.no_progress
    x_tr, y_tr = run_batches(fn, dataset, "train", args.batch_size, progress, f"{args.feature} train")
    x_val, y_val = run_batches(fn, dataset, "val", args.batch_size, progress, f"{args.feature} val")
    x_tr, x_val = standardise(x_tr, x_val)
    w, b, loss = train_linear(x_tr, y_tr, dataset.num_classes, wd=args.wd, steps=args.steps, lr=args.lr)
    results = {"task": "probe", "checkpoint": str(args.checkpoint), "data": dataset.name,
               "image_size": dataset.image_size, "feature": args.feature, "feature_dim": int(x_tr.shape[1]),
               "train_examples": len(y_tr), "val_examples": len(y_val), "steps": args.steps,
               "wd": args.wd, "lr": args.lr, "final_train_loss": loss,
               "train_accuracy": accuracy(x_tr, y_tr, w, b), "val_accuracy": accuracy(x_val, y_val, w, b),
               "chance": 1.0 / dataset.num_classes}
    out = write_results(results, args, "probe")
    print(f"linear probe on {args.feature} ({x_tr.shape[1]}-d): val top-1 "
          f"{100 * results['val_accuracy']:.2f}% on {len(y_val)} images (train "
          f"{100 * results['train_accuracy']:.2f}%, chance {100 / dataset.num_classes:.1f}%) -> {out}")
    print(json.dumps(results, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("probe", help="linear probe on frozen features; val top-1")
    add_common_args(p)
    p.add_argument("--feature", default="pre_logits",
                   help="pre_logits | encoded-mean | block_i-mean (mean over tokens)")
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=0.05, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--wd", type=float, default=1e-4, help="L2 on W: loss += wd/2 ||W||^2")
    p.set_defaults(func=cmd_probe)
