"""Full fine-tuning of a pretrained checkpoint to a new label set, at another resolution.

Fine-tuning is `vit22b train` with another config (big_vision's transfer pattern: the same train
loop): started from the checkpoint without its head (a new zero-initialised head of the new class
count; a learned position embedding resampled in 2-D to the new grid; train_state.initial_params), with
softmax cross-entropy and the transfer optimiser of big_vision `configs/transfer.py` (SGD with
momentum 0.9, or adafactor/adamw; cosine schedule with linear warm-up, global-norm clip 1.0, no
weight decay). So it runs on any `--mesh`, multi-host, with `--collective-matmul`, writes orbax
checkpoints, resumes after a crash and logs metrics.jsonl / TensorBoard as `vit22b train` does.

    vit22b finetune --checkpoint W --data digits --image-size 16 --workdir OUT --steps 300

writes OUT/model.safetensors + config.json + classes.json + final.json + finetune.json
(+ checkpoints/, metrics.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from vit22b.cli_args import (
    add_model_flags,
    add_run_flags,
    check_train_args,
    init_distributed,
    model_overrides,
    run_fields,
)
from vit22b.config import EXECUTION_FIELDS, ModelConfig
from vit22b.data import ImageDataset, load_dataset
from vit22b.optim import OptimConfig
from vit22b.tasks.common import TaskError
from vit22b.train import TrainConfig, train
from vit22b.weights import read_config


def transfer_optim(optimizer: str = "sgd", lr: float = 0.03, warmup: int = 0, clip: float = 1.0,
                   wd: float = 0.0) -> OptimConfig:
    """big_vision transfer optimiser: cosine, linear warm-up, clip, no weight decay by default."""
    return OptimConfig(optimizer=optimizer, learning_rate=lr, schedule="cosine",  # type: ignore[arg-type]
                       warmup_steps=warmup, weight_decay=wd, head_wd_mult=1.0, grad_clip_norm=clip,
                       momentum_dtype="float32")


def source_config(checkpoint: str | Path) -> ModelConfig:
    """The checkpoint's architecture, from its metadata alone (the weights are read once, later)."""
    source = read_config(checkpoint)
    if source is None:
        raise TaskError(f"{checkpoint} carries no vit22b config: cannot tell its architecture "
                            "(import it first with `vit22b import`)")
    return source


def finetune_model_config(source: ModelConfig, dataset: ImageDataset, **execution: Any) -> ModelConfig:
    """The checkpoint's architecture with the new data's classes and resolution, zero head; only
    execution settings (remat, scan, dtypes, collective matmul) may be changed on top."""
    if source.in_channels != dataset.in_channels:
        raise TaskError(
            f"the checkpoint takes {source.in_channels}-channel images but {dataset.name!r} has "
            f"{dataset.in_channels}-channel images: the patch embedding cannot be reused; fine-tune "
            f"on {source.in_channels}-channel data (or train from scratch with `vit22b train`).")
    other = sorted(set(execution) - set(EXECUTION_FIELDS))
    if other:
        raise TaskError(f"{other} would change the checkpoint's architecture: fine-tuning keeps "
                        f"it; only {EXECUTION_FIELDS} may be set")
    return source.replace(num_classes=dataset.num_classes, image_size=dataset.image_size,
                          head_bias_init=0.0, **execution)


def finetune(checkpoint: str | Path, dataset: ImageDataset, workdir: str | Path | None, *,
             steps: int = 300, batch_size: int = 64, optim: OptimConfig | None = None,
             scratch: bool = False, execution: dict[str, Any] | None = None,
             **run: Any) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `dataset` with `vit22b train`'s loop; `scratch=True`: the same
    model and budget from a fresh init (the baseline). `run`: TrainConfig's execution fields
    (mesh, seed, augment, progress, checkpoint_every, ...). Without a `workdir` the run's files go
    to a temporary directory that is removed afterwards."""
    t0 = time.time()
    source = source_config(checkpoint)
    model = finetune_model_config(source, dataset, **(execution or {}))
    optim = optim or transfer_optim(warmup=max(1, steps // 20))
    with tempfile.TemporaryDirectory() as scratch_dir:
        cfg = TrainConfig(model=model, optim=optim, workdir=str(workdir or scratch_dir),
                          data=dataset.name, steps=steps, batch_size=batch_size, loss="softmax",
                          init_from=None if scratch else str(checkpoint), **run)
        r = train(cfg, dataset)
    result = {
        "val_accuracy": r["eval_accuracy"], "steps": steps, "seconds": time.time() - t0,
        "source_checkpoint": str(checkpoint), "from_scratch": scratch, "data": dataset.name,
        "num_classes": model.num_classes, "source_num_classes": source.num_classes,
        "resolution": {"from": source.image_size, "to": model.image_size,
                       "grid_from": source.grid_size, "grid_to": model.grid_size},
        "batch_size": batch_size, "seed": cfg.seed, "mesh": cfg.mesh, "resumed_from": r["resumed_from"],
        "optim": dataclasses.asdict(optim), "train_examples": dataset.train_size,
        "val_examples": dataset.val_size,
    }
    if workdir and jax.process_index() == 0:  # the process that writes the run's files
        (Path(workdir) / "finetune.json").write_text(json.dumps(result, indent=2))
    return result


def add_transfer_flags(p: argparse.ArgumentParser, source_flag: str, optimizers: list[str], lr: float,
                       steps: int) -> None:
    """The flags fine-tuning and distillation share: the source model (`source_flag`), data,
    budget, transfer optimiser, and how the run executes (`vit22b train`'s --mesh, checkpoints,
    resume...)."""
    p.add_argument(source_flag, required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--data", default="digits", help="'digits', 'fashion-mnist', 'idx:DIR', a "
                   "prepare-data directory or an image folder")
    p.add_argument("--val-data", default=None, help="held-out image folder (default: a split)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--workdir", required=True, help="run the same command again to resume")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=optimizers, default=optimizers[0],
                   help="sgd: momentum 0.9 (big_vision transfer); adamw with --wd 0 is Adam")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="default 5%% of the steps")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--wd", type=float, default=0.0, help="decoupled weight decay (x lr)")
    p.add_argument("--no-augment", action="store_true")
    add_run_flags(p)


def start_transfer(args: argparse.Namespace, image_size: int) -> tuple[ImageDataset, dict[str, Any]]:
    """Checks the flags, joins the processes, reads the data: (data set, the keyword arguments of
    `finetune`/`distill` that add_transfer_flags set)."""
    check_train_args(args)
    init_distributed(args)
    dataset = load_dataset(args.data, image_size, val_path=args.val_data,
                           val_fraction=args.val_fraction, seed=args.seed)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    optim = transfer_optim(args.optimizer, args.lr, warmup, args.clip, args.wd)
    return dataset, dict(steps=args.steps, batch_size=args.batch_size, optim=optim,
                         augment=not args.no_augment, **run_fields(args))


def cmd_finetune(args: argparse.Namespace) -> int:
    source = source_config(args.checkpoint)
    dataset, run = start_transfer(args, args.image_size or source.image_size)
    print(f"fine-tuning {args.checkpoint} on {dataset.name} ({dataset.num_classes} classes, "
          f"{dataset.image_size}px, {dataset.train_size} train / {dataset.val_size} val) -> {args.workdir}")
    r = finetune(args.checkpoint, dataset, args.workdir, scratch=args.from_scratch,
                 execution=model_overrides(args), **run)
    print(f"val accuracy {100 * r['val_accuracy']:.2f}% after {r['steps']} steps, "
          f"{r['seconds']:.0f} s ({r['resolution']['from']} -> {r['resolution']['to']} px; "
          f"results: {args.workdir}/finetune.json)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint to new classes/resolution "
                              "(`train` from the checkpoint, any --mesh, resumable)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--from-scratch", action="store_true",
                   help="baseline: same model and budget, fresh init instead of the checkpoint")
    add_transfer_flags(p, "--checkpoint", ["sgd", "adafactor", "adamw"], lr=0.03, steps=300)
    add_model_flags(p, only=EXECUTION_FIELDS)
    p.set_defaults(func=cmd_finetune)
