"""`vit22b video`: video classification with a small temporal model on frozen per-frame features.

Protocol (the ViT-22B paper's video evaluation, vit22b-facts.md section 3, [MEM]: Kinetics-400 and
Moments in Time, the 22B model frozen as a per-frame encoder, a small temporal model trained on top,
ViViT factorised-encoder style):

1. Every clip is T uniformly sampled frames (video_data.py). Each frame goes through the frozen
   checkpoint once (eval preprocessing, no augmentation): `pre_logits` -> [clips, T, D], or token
   features (`encoded`, `stem`, `block_i`) -> [clips, T, P, D]; `<name>-mean` (mean over tokens)
   also works. The features are standardised per dimension with the train statistics.
2. A temporal head is trained on them with softmax cross-entropy (`common.fit_module`: AdamW, weight
   decay on matrices only, warm-up + cosine decay, random minibatches without replacement):
   - `mean`: average over time (and tokens) + a linear classifier (temporal average pooling; blind
     to frame order by construction);
   - `concat`: a linear classifier on the concatenated frames (order-aware, no weight sharing);
   - `transformer`: a linear embedding to `--head-width`, learned temporal position embedding
     (token features: each frame's grid embedded as one token, or `--tokens joint`: every token
     embedded, + a learned spatial position embedding, attended jointly), `--head-depth`
     pre-LN blocks (text.py's: MHSA + GELU MLP), a final LayerNorm, a CLS token (ViViT) or MAP pooling
     (big_vision MAPHead: probe attends, then x + MLP(LN(x))), and a linear classifier.
   Classifiers are zero-initialised (big_vision).
3. Top-1 on val and train is reported per head (several heads can share one feature pass:
   `--head mean,transformer`); on the generated clips also top-1 "up to reversal" (right = left,
   down = up). Mean pooling can do well on that, but it cannot tell a clip from its reversal, so
   on exact top-1 it can be right on at most half of each reversed pair of classes.

    vit22b video --checkpoint workdirs/digits --head mean,transformer
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit22b.tasks import common, text
from vit22b.tasks.common import TaskError, predict  # predict: a head's logits in batches
from vit22b.tasks.video_data import clip_features, load_clip_folder, load_moving_digits

HEADS = ("mean", "concat", "transformer")
Rng = np.random.Generator


# ----------------------------------------------------------------------------- temporal heads
# Layers are initialised from a numpy Generator: jax's per-shape RNG kernels cost seconds of XLA
# compilation on CPU, more than training a head this size. Inits follow big_vision / scenic:
# xavier-uniform kernels, zero biases, posemb normal(0.02), zero classifier.
def _xavier(rng: Rng, fan_in: int, fan_out: int) -> jax.Array:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jnp.asarray(rng.uniform(-limit, limit, (fan_in, fan_out)), jnp.float32)


def _params(tree: Any) -> Any:
    """numpy arrays -> nnx.Params, in text.py's nested-dict layout (for its transformer functions)."""
    return nnx.data(jax.tree.map(lambda a: nnx.Param(jnp.asarray(a)), tree))


class Dense(nnx.Module):
    """x @ kernel + bias, kernel [in, out] xavier-uniform (or zeros)."""

    def __init__(self, rng: Rng, fan_in: int, fan_out: int, *, zero: bool = False):
        self.kernel = nnx.Param(jnp.zeros((fan_in, fan_out)) if zero else _xavier(rng, fan_in, fan_out))
        self.bias = nnx.Param(jnp.zeros((fan_out,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class LinearHead(nnx.Module):
    """A linear classifier on mean_{t(,p)} x[b] (`mean`) or on flatten(x)[b] (`concat`: a separate
    weight per frame, so order matters)."""

    def __init__(self, rng: Rng, feat_shape: tuple[int, ...], num_classes: int, *, concat: bool):
        self.concat = concat
        fan_in = math.prod(feat_shape) if concat else feat_shape[-1]
        self.classifier = Dense(rng, fan_in, num_classes, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] or [B, T, P, D] -> [B, C]
        if self.concat:
            return self.classifier(x.reshape(x.shape[0], -1))
        return self.classifier(x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1))


class TransformerHead(nnx.Module):
    """A small temporal transformer over [B, T, D] or [B, T, P, D] (per-frame or joint tokens)."""

    def __init__(self, rng: Rng, feat_shape: tuple[int, ...], num_classes: int, *, width: int = 64,
                 depth: int = 1, num_heads: int = 4, mlp_dim: int | None = None, pool: str = "cls",
                 tokens: str = "frame"):
        if pool not in ("cls", "map"):
            raise TaskError(f"--pool {pool!r}: use 'cls' or 'map'")
        if tokens not in ("frame", "joint"):
            raise TaskError(f"--tokens {tokens!r}: use 'frame' or 'joint'")
        if width % num_heads:
            raise TaskError(f"--head-width {width} is not a multiple of --head-heads {num_heads}")
        T, D = feat_shape[0], feat_shape[-1]
        mlp_dim = mlp_dim or 4 * width
        self.pool = pool
        # Token features [T, P, D]: "frame" embeds each frame's whole token grid (P*D -> W, keeps
        # where things are) and attends over T frame tokens; "joint" embeds every token and
        # attends over all T*P with a learned spatial posemb beside the temporal one.
        self.flatten = len(feat_shape) == 3 and tokens == "frame"
        self.embed = Dense(rng, feat_shape[1] * D if self.flatten else D, width)
        posemb = lambda n: nnx.Param(jnp.asarray(0.02 * rng.standard_normal((n, width)), jnp.float32))  # noqa: E731
        self.time_pos = posemb(T)
        self.space_pos = posemb(feat_shape[1]) if len(feat_shape) == 3 and not self.flatten else None
        self.cls = nnx.Param(jnp.zeros((1, width))) if pool == "cls" else None  # ViViT/scenic
        self.num_heads = num_heads
        kernel = functools.partial(_xavier, rng)
        self.blocks = nnx.List([_params(text.init_block(width, mlp_dim, kernel)) for _ in range(depth)])
        self.norm = _params(text.init_ln(width))
        if pool == "map":  # big_vision MAPHead: no LN before the attention, so no "ln1"
            self.probe = nnx.Param(_xavier(rng, 1, width))
            self.map = _params({k: v for k, v in text.init_block(width, mlp_dim, kernel).items()
                                if k != "ln1"})
        self.classifier = Dense(rng, width, num_classes, zero=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        B = x.shape[0]
        h = self.embed(x.reshape(*x.shape[:2], -1) if self.flatten else x)  # [B, T, (P,) W]
        if self.space_pos is not None:
            h = h + self.time_pos[...][:, None] + self.space_pos[...][None]
        else:
            h = h + self.time_pos[...]
        h = h.reshape(B, -1, h.shape[-1])  # [B, L, W], L = T or T*P (time-major)
        if self.cls is not None:
            h = jnp.concatenate([jnp.broadcast_to(self.cls[...], (B, 1, h.shape[-1])), h], axis=1)
        for p in self.blocks:
            h = text.block(h, p, self.num_heads)
        h = text.layer_norm(h, self.norm)
        if self.pool == "cls":
            pooled = h[:, 0]
        else:  # MAP: the probe attends over all tokens (no residual), then a residual MLP
            probe = jnp.broadcast_to(self.probe[...], (B, 1, h.shape[-1]))
            y = text.attention(probe, h, self.map, self.num_heads)
            pooled = text.residual_mlp(y, self.map)[:, 0]
        return self.classifier(pooled)


def make_head(kind: str, feat_shape: tuple[int, ...], num_classes: int, *, seed: int = 0,
              **transformer: Any) -> nnx.Module:
    """A head by name (`HEADS`); `transformer` kwargs: width, depth, num_heads, mlp_dim, pool, tokens."""
    rng = np.random.default_rng(seed)
    if kind in ("mean", "concat"):
        return LinearHead(rng, feat_shape, num_classes, concat=kind == "concat")
    if kind == "transformer":
        return TransformerHead(rng, feat_shape, num_classes, **transformer)
    raise TaskError(f"--head {kind!r}: use one of {', '.join(HEADS)} (comma-separated for several)")


# ----------------------------------------------------------------------------- training
def train_head(head: nnx.Module, x: np.ndarray, y: np.ndarray, *, steps: int = 500,
               batch_size: int = 64, lr: float = 1e-3, wd: float = 1e-4, seed: int = 0,
               progress: bool = True, desc: str = "head") -> tuple[nnx.Module, float]:
    """Train `head` on features x [N, ...] / labels y [N] by softmax cross-entropy
    (`common.fit_module`); returns (trained head, last loss)."""
    def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    head, losses = common.fit_module(head, x, y, loss_fn, steps=steps, batch_size=batch_size, lr=lr,
                                     wd=wd, seed=seed, progress=progress, desc=desc)
    return head, float(losses[-1])


# ----------------------------------------------------------------------------- the command
def _reversal_free(labels: np.ndarray) -> np.ndarray:
    """Generated-clip label -> (group, axis): right~left, down~up (DIRECTIONS order r, l, d, u)."""
    return (labels // 4) * 2 + (labels % 4) // 2


def cmd_video(args: argparse.Namespace) -> int:
    t0 = time.time()
    kinds = [k.strip() for k in args.head.split(",") if k.strip()]
    for kind in kinds:
        if kind not in HEADS:
            raise TaskError(f"--head {kind!r}: use one of {', '.join(HEADS)} (comma-separated for several)")
    model = common.load_backbone(args.checkpoint, args.image_size)
    fn = common.batch_fn(model, args.feature, tokens=True)  # [B, D], or [B, P, D] for token features
    size, channels = model.cfg.image_size, model.cfg.in_channels
    if args.data == "synthetic":
        data = load_moving_digits(size, channels, num_frames=args.num_frames, num_train=args.num_train,
                                  num_val=args.num_val, seed=args.seed, digit_size=args.digit_size,
                                  travel=args.travel, digit_groups=args.digit_groups)
    else:
        data = load_clip_folder(args.data, size, channels, num_frames=args.num_frames,
                                val_fraction=args.val_fraction, seed=args.seed)
    progress = not args.no_progress
    t1 = time.time()
    x_tr, y_tr = clip_features(fn, data, "train", args.feature_batch_size, progress)
    x_val, y_val = clip_features(fn, data, "val", args.feature_batch_size, progress)
    (x_tr, x_val), _ = common.standardise(x_tr, x_val, axes=tuple(range(x_tr.ndim - 1)))  # per dimension
    t2 = time.time()
    results: dict[str, Any] = {
        "task": "video", "checkpoint": str(args.checkpoint), "data": data.name,
        "image_size": data.image_size, "num_frames": data.num_frames, "feature": args.feature,
        "feature_shape": list(x_tr.shape[1:]), "num_classes": data.num_classes,
        "class_names": list(data.class_names), "train_clips": len(y_tr), "val_clips": len(y_val),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
        "seed": args.seed, "chance": 1.0 / data.num_classes, "heads": {},
        "seconds": {"load": t1 - t0, "features": t2 - t1}}
    lines = []
    for kind in kinds:
        t = time.time()
        cfg = ({"width": args.head_width, "depth": args.head_depth, "num_heads": args.head_heads,
                "pool": args.pool, "tokens": args.tokens} if kind == "transformer" else {})
        head = make_head(kind, x_tr.shape[1:], data.num_classes, seed=args.seed, **cfg)
        head, loss = train_head(head, x_tr, y_tr, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, wd=args.wd, seed=args.seed, progress=progress, desc=kind)
        pred = predict(head, np.concatenate([x_tr, x_val])).argmax(1)  # one compiled shape
        pred_tr, pred_val = pred[:len(y_tr)], pred[len(y_tr):]
        r: dict[str, Any] = {
            **cfg, "params": int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(head)))),
            "final_train_loss": loss, "train_accuracy": float(np.mean(pred_tr == y_tr)),
            "val_accuracy": float(np.mean(pred_val == y_val)),
            "val_per_class": {name: float(np.mean(pred_val[y_val == c] == c))
                              for c, name in enumerate(data.class_names) if (y_val == c).any()}}
        if data.name == "synthetic":
            same = _reversal_free(pred_val) == _reversal_free(y_val)
            r["val_accuracy_up_to_reversal"] = float(np.mean(same))
        r["seconds"] = time.time() - t
        results["heads"][kind] = r
        lines.append(f"{kind:>11} head: val top-1 {100 * r['val_accuracy']:.2f}% (train "
                     f"{100 * r['train_accuracy']:.2f}%"
                     + (f", up to reversal {100 * r['val_accuracy_up_to_reversal']:.2f}%"
                        if "val_accuracy_up_to_reversal" in r else "") + f"), {r['seconds']:.1f} s")
    results["seconds"]["total"] = time.time() - t0
    return common.finish(results, common.results_path("video", checkpoint=args.checkpoint, out=args.out),
                         "\n".join(lines) + f"\nvideo classification on frozen {args.feature} features "
                         f"{list(x_tr.shape[1:])} of {data.name!r} ({len(y_tr)} train / {len(y_val)} val "
                         f"clips, {data.num_frames} frames, {data.num_classes} classes, chance "
                         f"{100 / data.num_classes:.1f}%)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("video", help="video classification: temporal head on frozen per-frame "
                              "features; val top-1")
    common.add_backbone_args(p, data="synthetic", data_help="'synthetic' (generated moving digits) or a "
                             "clip folder DIR/<class>/<clip> (or DIR/train + DIR/val); a clip is a folder of "
                             "frames, a GIF/multi-frame image or a uint8 .npy [T, H, W, C]")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per clip")
    p.add_argument("--num-train", type=int, default=2048, help="generated train clips")
    p.add_argument("--num-val", type=int, default=512, help="generated val clips")
    p.add_argument("--digit-size", type=int, default=None, help="generated digit size (default 7S/8)")
    p.add_argument("--travel", type=int, default=None, help="generated digit's path length (default S/2)")
    p.add_argument("--digit-groups", type=int, default=2, help="generated classes: groups x 4 directions")
    p.add_argument("--feature", default="pre_logits",
                   help="pre_logits | encoded (tokens) | block_i | <token feature>-mean")
    p.add_argument("--head", default="mean,transformer",
                   help=f"{' | '.join(HEADS)}, or several comma-separated (trained on the same features)")
    p.add_argument("--pool", choices=["cls", "map"], default="cls", help="transformer pooling")
    p.add_argument("--tokens", choices=["frame", "joint"], default="frame",
                   help="token features, transformer: one token per frame (its grid embedded) or "
                   "joint space-time attention over all tokens (slower)")
    p.add_argument("--head-width", type=int, default=64)
    p.add_argument("--head-depth", type=int, default=1, help="transformer blocks")
    p.add_argument("--head-heads", type=int, default=4, help="attention heads")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="clips per training step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (matrices only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-batch-size", type=int, default=256, help="frames per forward pass")
    p.set_defaults(func=cmd_video)


if __name__ == "__main__":  # `python -m vit22b.tasks.video ARGS` = `vit22b video ARGS`
    import sys

    _parser = argparse.ArgumentParser(prog="vit22b")
    add_parser(_parser.add_subparsers())
    _args = _parser.parse_args(["video", *sys.argv[1:]])
    sys.exit(_args.func(_args))
