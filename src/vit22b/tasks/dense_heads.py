"""Dense decoders on frozen ViT patch tokens, their losses and metrics (`vit22b segment` / `depth`).

Protocol (the ViT-22B paper's dense evaluations on a frozen backbone, see the spec's section 3):
patch tokens are computed once per image, without augmentation, and only the decoder trains.

- `LinearDecoder` (Segmenter / big_vision "linear" decoder): a per-patch linear map of the final
  tokens (`encoded`) to K outputs, then bilinear upsampling of those *logits* to pixel resolution.
- `DPTDecoder` (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"): tokens of several
  blocks (`block_i`, by default 4 evenly spaced ones) are *reassembled* into a pyramid, the earliest
  block at 4x the token grid, then 2x, 1x and 1/2x (1x1 projection, then DPT's transposed conv with
  kernel = stride = factor, computed as the equivalent per-token linear map + depth-to-space; a 3x3
  conv for 1x, a stride-2 3x3 conv for 1/2x), fused top-down by residual conv units
  (RCU: x + conv(relu(conv(relu(x))))) with bilinear upsampling between levels, and a head
  conv3x3 -> bilinear resize to the image -> conv3x3 -> relu -> conv1x1. Deviation: the fused maps
  are resized to the next finer level's size instead of a fixed 2x, so any grid and level count work.
  (The paper used UperNet for segmentation; here the DPT-style decoder serves both tasks.)

Each level's tokens are standardised with the train set's per-channel mean and std (an affine
change the decoder could learn, but it makes Adam's step size meaningful for features of any scale).
Training (`common.fit_module`): AdamW (weight decay 1e-4 on kernels), global-norm clip 1.0, warm-up
+ cosine decay, random mini-batches of the cached tokens.

Losses: segmentation = mean per-pixel softmax cross-entropy over pixels whose label != 255.
Depth: the decoder predicts log-depth (positive depth by construction; errors are relative, so
1 m and 50 m objects weigh alike, which is what AbsRel measures), offset by the train mean log-depth;
`l1log` (default) = mean |log d - log d*|, `silog` = Eigen et al.'s scale-invariant log loss
sqrt(mean g^2 - 0.85 (mean g)^2), g = log d - log d* (lambda 0.85 as in BTS/AdaBins), both over valid
pixels (d* > 0).

Metrics: mIoU from the confusion matrix accumulated over the whole val set, IoU_c = TP / (TP + FP +
FN), averaged over the classes present in the ground truth or the prediction (a class absent from
both is excluded), ignore-255 pixels dropped; pixel accuracy = trace / total. Depth over all valid
val pixels pooled: AbsRel = mean |d - d*| / d*, RMSE = sqrt(mean (d - d*)^2), delta_k = fraction with
max(d / d*, d* / d) < 1.25^k.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange
from flax import nnx

from vit22b.image_files import normalise
from vit22b.model import ViT
from vit22b.tasks import common
from vit22b.tasks.common import TaskError
from vit22b.tasks.dense_data import IGNORE, DenseData, load_dense_data

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
PostFn = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- frozen tokens
def dpt_layers(depth: int, n: int = 4) -> tuple[int, ...]:
    """n evenly spaced block indices ending at the last block (DPT on ViT-L: 5, 11, 17, 23)."""
    return tuple(sorted({max(0, round((k + 1) * depth / n) - 1) for k in range(n)}))


def token_fn(model: ViT, layers: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
    """Jitted images [B, S, S, C] -> tokens [B, L, g, g, D]: `block_i` for i in `layers`, or the final
    `encoded` tokens (L = 1) for `layers=()`. A class token, if the model has one, is dropped."""
    g, n = model.cfg.grid_size, model.cfg.grid_size ** 2
    names = [f"block_{i}" for i in layers] or ["encoded"]

    @jax.jit
    def forward(images: jax.Array) -> jax.Array:
        _, out = model(images, return_layers=layers)
        tokens = jnp.stack([out[k][:, -n:] for k in names], axis=1)  # [B, L, N, D], patch tokens last
        return rearrange(tokens, "b l (h w) d -> b l h w d", h=g, w=g)

    return forward


# ----------------------------------------------------------------------------- decoders
def _resize(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")


class LinearDecoder(nnx.Module):
    """tokens [B, L, g, g, D] (the last level is used) -> per-patch linear -> bilinear to [B, S, S, K]."""

    def __init__(self, width: int, out: int, image_size: int, *, rngs: nnx.Rngs):
        self.image_size = image_size
        self.proj = nnx.Linear(width, out, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        logits = self.proj(tokens[:, -1])  # [B, g, g, K]
        return _resize(logits, (self.image_size, self.image_size))


class RCU(nnx.Module):
    """DPT's residual conv unit: x + conv3x3(relu(conv3x3(relu(x))))."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(ch, ch, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(ch, ch, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(jax.nn.relu(self.conv1(jax.nn.relu(x))))


class DPTDecoder(nnx.Module):
    """tokens [B, L, g, g, D] -> [B, S, S, out]; see the module docstring (reassemble, fuse, head)."""

    FACTORS = (4, 2, 1, 0.5)  # level l (l-th requested block, earliest first) -> scale of the grid

    def __init__(self, width: int, levels: int, out: int, image_size: int, *, features: int = 32,
                 rngs: nnx.Rngs):
        if not 1 <= levels <= len(self.FACTORS):
            raise TaskError(f"the DPT decoder takes 1 to 4 token levels, got {levels}: pass <= 4 --layers")
        self.image_size, f = image_size, features
        self.factors = self.FACTORS[:levels]
        self.project = nnx.List([nnx.Linear(width, f, rngs=rngs) for _ in self.factors])
        resample: list[nnx.Module] = []
        for k in self.factors:
            if k > 1:  # DPT's ConvTranspose with kernel = stride = k, as the equal (and on CPU ~50x
                # faster) per-token linear map to k*k*f values followed by depth-to-space
                resample.append(nnx.Linear(f, f * k * k, rngs=rngs))
            else:  # 1x: a 3x3 conv; 1/2x: a stride-2 3x3 conv
                resample.append(nnx.Conv(f, f, (3, 3), strides=int(round(1 / k)), rngs=rngs))
        self.resample = nnx.List(resample)
        self.skip = nnx.List([RCU(f, rngs=rngs) for _ in self.factors])  # on each level's map
        self.fuse = nnx.List([RCU(f, rngs=rngs) for _ in self.factors])  # after adding the coarser path
        self.head1 = nnx.Conv(f, max(f // 2, 1), (3, 3), rngs=rngs)
        self.head2 = nnx.Conv(max(f // 2, 1), 32, (3, 3), rngs=rngs)
        self.head3 = nnx.Conv(32, out, (1, 1), rngs=rngs)

    def _reassemble(self, i: int, tokens: jax.Array) -> jax.Array:
        """Level i: tokens [B, g, g, D] -> map [B, g k, g k, f] (k = self.factors[i])."""
        x, k = self.resample[i](self.project[i](tokens)), self.factors[i]
        if k > 1:  # [B, g, g, k*k*f] -> [B, g*k, g*k, f]: token (h, w) fills pixels (h*k + p, w*k + q)
            x = rearrange(x, "b h w (p q c) -> b (h p) (w q) c", p=k, q=k)
        return x

    def __call__(self, tokens: jax.Array) -> jax.Array:
        maps = [self._reassemble(i, tokens[:, i]) for i in range(len(self.factors))]
        fused = self.fuse[-1](self.skip[-1](maps[-1]))  # the coarsest (deepest) level
        for i in range(len(maps) - 2, -1, -1):  # top-down: upsample to level i, add its refined map
            fused = _resize(fused, maps[i].shape[1:3]) + self.skip[i](maps[i])
            fused = self.fuse[i](fused)
        x = _resize(self.head1(fused), (self.image_size, self.image_size))
        return self.head3(jax.nn.relu(self.head2(x)))


def make_decoder(kind: str, width: int, levels: int, out: int, image_size: int, *, features: int = 32,
                 seed: int = 0) -> nnx.Module:
    """'linear' or 'dpt' decoder of `levels` token levels of `width` channels -> `out` per pixel.

    Built abstractly, then filled from numpy: LeCun-normal kernels (std 1/sqrt(fan_in), flax's default
    scale) and zero biases, seeded by `seed`; jax's per-shape random kernels take ~10 s to compile on CPU."""
    if kind == "linear":
        build = lambda: LinearDecoder(width, out, image_size, rngs=nnx.Rngs(0))  # noqa: E731
    elif kind == "dpt":
        build = lambda: DPTDecoder(width, levels, out, image_size, features=features,  # noqa: E731
                                   rngs=nnx.Rngs(0))
    else:
        raise TaskError(f"unknown decoder {kind!r}: use 'linear' or 'dpt'")
    graphdef, state = nnx.split(nnx.eval_shape(build), nnx.Param)
    rng = np.random.default_rng([seed, 3])

    def fill(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
        if str(path[-1]) == "kernel":  # [..., fan_in, fan_out] for Linear and Conv alike
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    values = jax.tree_util.tree_map_with_path(lambda p, x: fill(tuple(k.key for k in p), x),
                                              nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- losses
def segment_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax CE over pixels with label != 255; logits [B, S, S, K], labels [B, S, S]."""
    valid = labels != IGNORE
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def depth_loss(log_pred: jax.Array, depth: jax.Array, kind: str = "l1log") -> jax.Array:
    """'l1log' or 'silog' (module docstring) over pixels with depth > 0; log_pred, depth [B, S, S]."""
    valid = depth > 0
    n = jnp.maximum(jnp.sum(valid), 1)
    g = jnp.where(valid, log_pred - jnp.log(jnp.where(valid, depth, 1.0)), 0.0)
    if kind == "l1log":
        return jnp.sum(jnp.abs(g)) / n
    if kind == "silog":
        mean = jnp.sum(g) / n
        return jnp.sqrt(jnp.maximum(jnp.sum(g * g) / n - 0.85 * mean ** 2, 1e-12))
    raise TaskError(f"unknown depth loss {kind!r}: use 'l1log' or 'silog'")


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K], rows = ground truth, columns = prediction; pixels with gt == 255 are skipped."""
    keep = gt != IGNORE
    idx = gt[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(cm: np.ndarray) -> dict[str, Any]:
    """mIoU over the classes in the ground truth or prediction, per-class IoU (None: absent from both),
    pixel accuracy."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp  # TP + FP + FN
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.mean(iou[present])) if present.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "classes_counted": int(present.sum())}


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """AbsRel, RMSE, delta1..3 over pixels with gt > 0 (pred must be > 0 there)."""
    valid = gt > 0
    d, t = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    ratio = np.maximum(d / t, t / d)
    return {"abs_rel": float(np.mean(np.abs(d - t) / t)), "rmse": float(np.sqrt(np.mean((d - t) ** 2))),
            "delta1": float(np.mean(ratio < 1.25)), "delta2": float(np.mean(ratio < 1.25 ** 2)),
            "delta3": float(np.mean(ratio < 1.25 ** 3)), "valid_pixels": int(valid.sum())}


# ----------------------------------------------------------------------------- training
# the decoders' trainer: global-norm clip 1 (module docstring)
fit_decoder = functools.partial(common.fit_module, clip=1.0, desc="decoder")


def decoder_layers(model: ViT, decoder: str, layers: str | None) -> tuple[int, ...]:
    """() (the final `encoded` tokens) for 'linear'; the --layers blocks (default `dpt_layers`) for 'dpt'."""
    depth = model.cfg.depth
    if decoder == "linear":
        return ()
    if layers is None:
        return dpt_layers(depth)
    try:
        chosen = tuple(int(v) for v in layers.split(","))
    except ValueError:
        chosen = ()
    if not chosen or len(chosen) > 4 or any(not 0 <= i < depth for i in chosen):
        raise TaskError(f"--layers {layers!r}: give 1 to 4 comma-separated block indices in 0..{depth - 1} "
                        f"(the checkpoint has {depth} blocks), e.g. {','.join(map(str, dpt_layers(depth)))}")
    return tuple(sorted(set(chosen)))


def fit_dense(model: ViT, data: DenseData, out_channels: int, loss_fn: LossFn, post: PostFn, *,
              kind: str = "dpt", layers: str | None = None, features: int = 32, steps: int = 600,
              batch_size: int = 16, extract_batch: int = 128, lr: float | None = None, seed: int = 0,
              progress: bool = False, desc: str = "dense") -> tuple[nnx.Module, np.ndarray, dict[str, Any]]:
    """Frozen tokens -> standardise -> train a `kind` decoder -> post(decoder(val tokens)).
    Returns (decoder, val predictions, {"layers", "stats", "losses", "lr"})."""
    blocks = decoder_layers(model, kind, layers)
    fn = token_fn(model, blocks)  # uint8 images [N, S, S, C] -> float32 [N, L, g, g, D]; one compile
    tr, va = (common.apply_batched(fn, images, extract_batch, prepare=normalise, dtype=np.float32,
                                   progress=progress, desc=f"{desc} {split} tokens")
              for split, images in (("train", data.train_images), ("val", data.val_images)))
    (tr, va), (mean, std) = common.standardise(tr, va, axes=(0, 2, 3))  # per level and channel
    lr = lr if lr is not None else (1e-2 if kind == "linear" else 3e-3)
    decoder = make_decoder(kind, model.cfg.width, tr.shape[1], out_channels, model.cfg.image_size,
                           features=features, seed=seed)
    decoder, losses = fit_decoder(decoder, tr, data.train_targets, loss_fn, steps=steps,
                                  batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                                  desc=f"{desc} {kind}")
    info = {"layers": list(blocks) or ["encoded"], "stats": {"mean": mean, "std": std}, "losses": losses,
            "lr": lr}
    return decoder, common.predict(decoder, va, extract_batch, post=post, dtype=None), info


# ----------------------------------------------------------------------------- command plumbing
def add_dense_args(p: argparse.ArgumentParser, task: str) -> None:
    """The arguments `vit22b segment` and `vit22b depth` share."""
    target = "masks/<stem>.png" if task == "segment" else "depth/<stem>.npy|png"
    common.add_backbone_args(p, data="synthetic", data_help=f"'synthetic' (generated, exact labels) or a "
                             f"folder with images/ and {target} (or train/ and val/ sub-folders laid out so)")
    p.add_argument("--num-train", type=int, default=1000, help="synthetic train images")
    p.add_argument("--num-val", type=int, default=200, help="synthetic val images")
    p.add_argument("--decoder", choices=["linear", "dpt"], default="dpt",
                   help="linear: per-patch linear + bilinear upsampling; dpt: multi-layer conv decoder")
    p.add_argument("--layers", default=None,
                   help="dpt: comma-separated block indices (default 4 evenly spaced, ending at the last)")
    p.add_argument("--features", type=int, default=32, help="dpt decoder channels")
    p.add_argument("--steps", type=int, default=600, help="decoder training steps")
    p.add_argument("--batch-size", type=int, default=16, help="decoder training batch")
    p.add_argument("--extract-batch", type=int, default=128, help="frozen-feature extraction batch")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW lr (default 3e-3 dpt, 1e-2 linear)")
    p.add_argument("--seed", type=int, default=0, help="data generation, split, init and batches")
    p.add_argument("--workdir", default=None, help="writes <task>.json and <task>_decoder.safetensors here")


def cmd_dense(args: argparse.Namespace, task: str, head: Callable[[DenseData], tuple[int, LossFn, PostFn]],
              evaluate: Callable[[DenseData, np.ndarray], tuple[dict[str, Any], str]]) -> int:
    """The body `vit22b segment` and `vit22b depth` share: load the backbone and the data, fit the
    decoder that head(data) = (out channels, loss, post-processing) defines, then write what
    evaluate(data, val predictions) = (metrics, summary) reports."""
    t0 = time.time()
    model = common.load_backbone(args.checkpoint, args.image_size)
    data = load_dense_data(task, args.data, image_size=model.cfg.image_size,
                           in_channels=model.cfg.in_channels,
                           num_train=args.num_train, num_val=args.num_val, val_fraction=args.val_fraction,
                           seed=args.seed, num_classes=getattr(args, "num_classes", None))
    out_channels, loss_fn, post = head(data)
    decoder, pred, info = fit_dense(model, data, out_channels, loss_fn, post, kind=args.decoder,
                                    layers=args.layers, features=args.features, steps=args.steps,
                                    batch_size=args.batch_size, extract_batch=args.extract_batch, lr=args.lr,
                                    seed=args.seed, progress=not args.no_progress, desc=task)
    metrics, summary = evaluate(data, pred)
    losses = info["losses"]
    results: dict[str, Any] = {
        "task": task, "checkpoint": str(args.checkpoint), "data": data.name, "image_size": data.image_size,
        "patch_size": model.cfg.patch_size, "grid_size": model.cfg.grid_size, "decoder": args.decoder,
        "layers": info["layers"], "features": args.features if args.decoder == "dpt" else None,
        "train_examples": len(data.train_images), "val_examples": len(data.val_images),
        "steps": args.steps, "batch_size": args.batch_size, "lr": info["lr"], "seed": args.seed,
        "first_train_loss": float(losses[0]), "final_train_loss": float(np.mean(losses[-10:])), **metrics,
        "seconds": round(time.time() - t0, 2)}
    if args.workdir:
        # the decoder's params (nnx path names) + the token standardisation, its config as metadata
        meta = {k: results[k] for k in ("task", "decoder", "layers", "features", "image_size")}
        tensors = {**nnx.to_pure_dict(nnx.state(decoder, nnx.Param)),
                   "token_mean": info["stats"]["mean"], "token_std": info["stats"]["std"]}
        common.save_head(Path(args.workdir) / f"{task}_decoder.safetensors", tensors,
                         {"vit22b_dense": json.dumps(meta)})
    path = common.results_path(task, checkpoint=args.checkpoint, out=args.out, workdir=args.workdir)
    layers = ",".join(map(str, info["layers"]))
    return common.finish(results, path, f"{task} ({args.decoder} on {layers}, {data.image_size} px) "
                         f"{summary}; train loss {losses[0]:.3f} -> {results['final_train_loss']:.3f} in "
                         f"{args.steps} steps, {results['seconds']:.0f} s")
