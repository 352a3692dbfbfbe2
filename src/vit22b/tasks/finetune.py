"""Full fine-tuning of a pretrained checkpoint to a new label set, at another resolution.

Protocol (big_vision `configs/transfer.py`): the body is loaded from the checkpoint; the head is
dropped (`dont_load=['head/kernel', 'head/bias']`) and a new zero-initialised head of the new
class count is made; a learned position embedding is resampled in 2-D to the new grid on load;
every parameter is trained with softmax cross-entropy, SGD with momentum 0.9 (or adafactor/adamw),
a cosine schedule with linear warm-up, global-norm clip 1.0 and no weight decay. Batches are the
data set's augmented train stream (batch s = f(seed, s)); the result is evaluated on its val split.

    vit22b finetune --checkpoint W --data digits --image-size 16 --workdir OUT --steps 300

writes OUT/model.safetensors + config.json + classes.json + finetune.json (+ metrics.jsonl).
`fit` is the small single-device loop shared with `distill.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from vit22b.config import ModelConfig
from vit22b.data import ImageDataset, load_dataset
from vit22b.metrics import MetricsWriter
from vit22b.model import abstract_model, apply, init_model, split_params
from vit22b.optim import OptimConfig, make_optimizer
from vit22b.train import TrainingError, classification_loss, evaluate, make_predict
from vit22b.weights import fit_weights, flatten, read_weights, save_model, unflatten

HEAD = ("head_kernel", "head_bias")
# loss_fn(params, batch, frozen) -> (loss, {name: scalar}); `frozen` is passed through untouched.
LossFn = Callable[[Any, dict[str, jax.Array], Any], tuple[jax.Array, dict[str, jax.Array]]]


class FinetuneError(ValueError):
    """A checkpoint that cannot be fine-tuned on the given data; the message says why."""


def transfer_optim(optimizer: str = "sgd", lr: float = 0.03, warmup: int = 0, clip: float = 1.0,
                   wd: float = 0.0) -> OptimConfig:
    """big_vision transfer optimiser: cosine, linear warm-up, clip, no weight decay by default."""
    return OptimConfig(optimizer=optimizer, learning_rate=lr, schedule="cosine",  # type: ignore[arg-type]
                       warmup_steps=warmup, weight_decay=wd, head_wd_mult=1.0, grad_clip_norm=clip,
                       momentum_dtype="float32")


def fit(graphdef: Any, params: Any, loss_fn: LossFn, tx: optax.GradientTransformation,
        batches: Iterator[dict[str, np.ndarray]], steps: int, *, frozen: Any = None,
        progress: bool = True, desc: str = "train", writer: MetricsWriter | None = None,
        log_every: int = 25) -> Any:
    """`steps` jitted updates on one device (no mesh); returns the trained params.

    Stops with TrainingError on a non-finite loss. (The hook that would let train.train do this:
    a `loss_fn`/`init_params` argument to make_train_step/init_state; see the report.)"""
    del graphdef  # the loss closes over it; kept in the signature for symmetry with train.py

    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array], frozen: Any
             ) -> tuple[Any, Any, dict[str, jax.Array]]:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, frozen)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state,
                {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux})

    jitted = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jax.numpy.asarray, params)
    opt_state = tx.init(params)
    bar = tqdm(total=steps, disable=not progress, unit="step", desc=desc, dynamic_ncols=True)
    try:
        for s in range(1, steps + 1):
            batch = next(batches)
            params, opt_state, metrics = jitted(params, opt_state,
                                                {"image": batch["image"], "label": batch["label"]},
                                                frozen)
            bar.update(1)
            if s % log_every == 0 or s == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(m["loss"]):
                    raise TrainingError(f"non-finite loss at step {s}: lower --lr or check the data")
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if writer is not None:
                    writer.write(s, **{f"train/{k}": v for k, v in m.items()})
    finally:
        bar.close()
    return params


def finetune_model_config(source: ModelConfig, dataset: ImageDataset) -> ModelConfig:
    """The checkpoint's architecture with the new data's classes and resolution, zero head."""
    if source.in_channels != dataset.in_channels:
        raise FinetuneError(
            f"the checkpoint takes {source.in_channels}-channel images but {dataset.name!r} has "
            f"{dataset.in_channels}-channel images: the patch embedding cannot be reused; fine-tune "
            f"on {source.in_channels}-channel data (or train from scratch with `vit22b train`).")
    return source.replace(num_classes=dataset.num_classes, image_size=dataset.image_size,
                          head_bias_init=0.0)


def load_pretrained(checkpoint: str | Path, dataset: ImageDataset
                    ) -> tuple[ModelConfig, ModelConfig, Any, dict[str, np.ndarray]]:
    """(source config, new config, graphdef, params): body from the checkpoint (posemb resampled
    in 2-D by fit_weights), head new and all zeros."""
    flat, source = read_weights(checkpoint)
    if source is None:
        raise FinetuneError(f"{checkpoint} carries no vit22b config: cannot tell its architecture")
    cfg = finetune_model_config(source, dataset)
    graphdef, expected = split_params(abstract_model(cfg))
    fitted = flatten(fit_weights(flat, expected, skip=HEAD))
    for name in HEAD:  # skipped -> the abstract leaf: replace by the zero init
        fitted[name] = np.zeros(fitted[name].shape, np.float32)
    return source, cfg, graphdef, unflatten(fitted)


def softmax_loss(graphdef: Any) -> LossFn:
    def loss_fn(params: Any, batch: dict[str, jax.Array], _: Any) -> tuple[jax.Array, dict]:
        logits, _ = apply(graphdef, params, batch["image"])
        return classification_loss(logits, batch["label"], "softmax"), {}
    return loss_fn


def finetune(checkpoint: str | Path, dataset: ImageDataset, workdir: str | Path | None, *,
             steps: int = 300, batch_size: int = 64, optim: OptimConfig | None = None,
             seed: int = 0, augment: bool = True, scratch: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `dataset`; `scratch=True`: same model and budget from a fresh
    init (the baseline). Writes the model dir and finetune.json when `workdir` is given."""
    t0 = time.time()
    optim = optim or transfer_optim(warmup=max(1, steps // 20))
    source, cfg, graphdef, params = load_pretrained(checkpoint, dataset)
    if scratch:
        _, params = split_params(init_model(cfg, seed=seed))
    tx = make_optimizer(optim, params, steps)
    writer = MetricsWriter(workdir, tensorboard=False) if workdir else None
    batches = dataset.train_batches(batch_size, seed=seed, augment=augment)
    params = fit(graphdef, params, softmax_loss(graphdef), tx, batches, steps, progress=progress,
                 desc="finetune", writer=writer)
    accuracy = evaluate(make_predict(graphdef), params, dataset, batch_size)
    result = {
        "val_accuracy": accuracy, "steps": steps, "seconds": time.time() - t0,
        "source_checkpoint": str(checkpoint), "from_scratch": scratch, "data": dataset.name,
        "num_classes": cfg.num_classes, "source_num_classes": source.num_classes,
        "resolution": {"from": source.image_size, "to": cfg.image_size,
                       "grid_from": source.grid_size, "grid_to": cfg.grid_size},
        "batch_size": batch_size, "seed": seed, "optim": dataclasses.asdict(optim),
        "train_examples": dataset.train_size, "val_examples": dataset.val_size,
    }
    if workdir:
        write_run(workdir, "finetune", result, writer, accuracy, steps, params, cfg, dataset)
    return result


def write_run(workdir: str | Path, task: str, result: dict, writer: Any, accuracy: float, steps: int,
              params: Any, cfg: Any, dataset: Any) -> None:
    """A task's model directory: final metric, weights + config, class names, `<task>.json`."""
    writer.write(steps, **{"eval/accuracy": accuracy})
    writer.close()
    save_model(workdir, params, cfg)
    (Path(workdir) / "classes.json").write_text(json.dumps(list(dataset.class_names)))
    (Path(workdir) / f"{task}.json").write_text(json.dumps(result, indent=2))


def cmd_finetune(args: argparse.Namespace) -> int:
    _, source = read_weights(args.checkpoint)
    image_size = args.image_size or (source.image_size if source else 224)
    dataset = load_dataset(args.data, image_size, val_path=args.val_data,
                           val_fraction=args.val_fraction, seed=args.seed)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    optim = transfer_optim(args.optimizer, args.lr, warmup, args.clip, args.wd)
    print(f"fine-tuning {args.checkpoint} on {dataset.name} ({dataset.num_classes} classes, "
          f"{image_size}px, {dataset.train_size} train / {dataset.val_size} val) -> {args.workdir}")
    r = finetune(args.checkpoint, dataset, args.workdir, steps=args.steps,
                 batch_size=args.batch_size, optim=optim, seed=args.seed,
                 augment=not args.no_augment, scratch=args.from_scratch,
                 progress=not args.no_progress)
    print(f"val accuracy {100 * r['val_accuracy']:.2f}% after {r['steps']} steps, "
          f"{r['seconds']:.0f} s ({r['resolution']['from']} -> {r['resolution']['to']} px; "
          f"results: {args.workdir}/finetune.json)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint to new classes/resolution")
    p.add_argument("--checkpoint", required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--data", default="digits", help="'digits' or an image folder")
    p.add_argument("--val-data", default=None, help="held-out image folder (default: a split)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=["sgd", "adafactor", "adamw"], default="sgd",
                   help="sgd: momentum 0.9 (big_vision transfer)")
    p.add_argument("--lr", type=float, default=0.03, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="default 5%% of the steps")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--wd", type=float, default=0.0, help="decoupled weight decay (x lr)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--from-scratch", action="store_true",
                   help="baseline: same model and budget, fresh init instead of the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)
