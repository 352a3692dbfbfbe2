"""Knowledge distillation: a frozen teacher checkpoint -> a fresh student of any preset.

Protocol (big_vision `trainers/proj/distill`, "patient and consistent" function matching, Beyer
et al. 2022): each step draws ONE augmented batch; teacher and student both run on that same view
(two forwards, the teacher's under stop_gradient, its params never updated). The loss is
big_vision's `dist(kind='kl')`:

    KL_t = t^2 * mean_batch sum_c softmax(teacher/t)_c * (log_softmax(teacher/t) - log_softmax(student/t))_c

optionally mixed with the hard-label loss: loss = (1 - a) * KL_t + a * CE(student, labels)
(`--label-weight a`; a = 1 is plain label training with the identical pipeline, the baseline).
The student is freshly initialised (zero head), trained with adamw (no weight decay) or
adafactor, cosine schedule with warm-up, clip 1.0. The data are read at the teacher's resolution,
which the student shares.

    vit22b distill --teacher W_T --student-preset mu/4 --data digits --workdir OUT --steps 500

writes OUT/model.safetensors + config.json + classes.json + distill.json (+ metrics.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from vit22b.config import ModelConfig, preset
from vit22b.data import ImageDataset, load_dataset
from vit22b.metrics import MetricsWriter
from vit22b.model import abstract_model, apply, init_model, split_params
from vit22b.optim import OptimConfig, make_optimizer
from vit22b.tasks.finetune import FinetuneError, LossFn, fit, transfer_optim, write_run
from vit22b.train import classification_loss, evaluate, make_predict
from vit22b.weights import fit_weights, read_weights


def kl_distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """t^2 * KL(softmax(teacher/t) || softmax(student/t)), summed over classes, batch mean.
    No gradient flows into the teacher logits."""
    t = temperature
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p = jax.nn.log_softmax(teacher / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return t**2 * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def load_teacher(checkpoint: str | Path) -> tuple[ModelConfig, Any, Any]:
    """(config, graphdef, params) of the teacher, exactly as stored (no resampling)."""
    flat, cfg = read_weights(checkpoint)
    if cfg is None:
        raise FinetuneError(f"teacher {checkpoint} carries no vit22b config")
    if not cfg.num_classes:
        raise FinetuneError(f"teacher {checkpoint} has no classifier head (num_classes 0)")
    graphdef, expected = split_params(abstract_model(cfg))
    return cfg, graphdef, jax.tree.map(jnp.asarray, fit_weights(flat, expected))


def student_config(student_preset: str, teacher: ModelConfig, **overrides: Any) -> ModelConfig:
    """The preset at the teacher's resolution, channels and classes; fresh zero head."""
    fields = dict(image_size=teacher.image_size, in_channels=teacher.in_channels,
                  num_classes=teacher.num_classes, head_bias_init=0.0)
    return preset(student_preset, **{**fields, **overrides})


def distill_loss(student_def: Any, teacher_def: Any, temperature: float,
                 label_weight: float) -> LossFn:
    def loss_fn(params: Any, batch: dict[str, jax.Array], teacher_params: Any
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        student_logits, _ = apply(student_def, params, batch["image"])
        teacher_logits, _ = apply(teacher_def, teacher_params, batch["image"])  # the same view
        kl = kl_distill_loss(student_logits, teacher_logits, temperature)
        ce = classification_loss(student_logits, batch["label"], "softmax")
        return (1.0 - label_weight) * kl + label_weight * ce, {"kl": kl, "ce": ce}
    return loss_fn


def distill(teacher_checkpoint: str | Path, student_preset: str, dataset: ImageDataset,
            workdir: str | Path | None, *, steps: int = 500, batch_size: int = 64,
            temperature: float = 1.0, label_weight: float = 0.0, optim: OptimConfig | None = None,
            seed: int = 0, augment: bool = True, progress: bool = True,
            student_overrides: dict[str, Any] | None = None,
            teacher_accuracy: float | None = None) -> dict[str, Any]:
    """Distil the teacher into a fresh `student_preset` model on `dataset`'s train stream."""
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label weight {label_weight} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be positive")
    t0 = time.time()
    teacher_cfg, teacher_def, teacher_params = load_teacher(teacher_checkpoint)
    shape = (teacher_cfg.num_classes, teacher_cfg.in_channels, teacher_cfg.image_size)
    if shape != (dataset.num_classes, dataset.in_channels, dataset.image_size):
        raise FinetuneError(
            f"teacher (classes, channels, size) {shape} does not fit the data "
            f"{(dataset.num_classes, dataset.in_channels, dataset.image_size)}: distil on the data "
            "the teacher was trained for, at its resolution (fine-tune the teacher first)")
    cfg = student_config(student_preset, teacher_cfg, **(student_overrides or {}))
    student_def, params = split_params(init_model(cfg, seed=seed))
    optim = optim or transfer_optim("adamw", 3e-3, max(1, steps // 20))
    tx = make_optimizer(optim, params, steps)
    writer = MetricsWriter(workdir, tensorboard=False) if workdir else None
    params = fit(student_def, params,
                 distill_loss(student_def, teacher_def, temperature, label_weight), tx,
                 dataset.train_batches(batch_size, seed=seed, augment=augment), steps,
                 frozen=teacher_params, progress=progress, desc="distill", writer=writer)
    accuracy = evaluate(make_predict(student_def), params, dataset, batch_size)
    if teacher_accuracy is None:
        teacher_accuracy = evaluate(make_predict(teacher_def), teacher_params, dataset, batch_size)
    result = {
        "student_val_accuracy": accuracy, "teacher_val_accuracy": teacher_accuracy,
        "steps": steps, "seconds": time.time() - t0, "teacher_checkpoint": str(teacher_checkpoint),
        "student_preset": student_preset, "temperature": temperature,
        "label_weight": label_weight, "batch_size": batch_size, "seed": seed, "data": dataset.name,
        "optim": dataclasses.asdict(optim),
    }
    if workdir:
        write_run(workdir, "distill", result, writer, accuracy, steps, params, cfg, dataset)
    return result


def cmd_distill(args: argparse.Namespace) -> int:
    _, teacher = read_weights(args.teacher)
    if teacher is None:
        raise FinetuneError(f"teacher {args.teacher} carries no vit22b config")
    dataset = load_dataset(args.data, teacher.image_size, val_path=args.val_data,
                           val_fraction=args.val_fraction, seed=args.seed)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    optim = transfer_optim(args.optimizer, args.lr, warmup, args.clip, args.wd)
    print(f"distilling {args.teacher} -> {args.student_preset} on {dataset.name} "
          f"(t={args.temperature}, label weight {args.label_weight}) -> {args.workdir}")
    r = distill(args.teacher, args.student_preset, dataset, args.workdir, steps=args.steps,
                batch_size=args.batch_size, temperature=args.temperature,
                label_weight=args.label_weight, optim=optim, seed=args.seed,
                augment=not args.no_augment, progress=not args.no_progress)
    print(f"student val accuracy {100 * r['student_val_accuracy']:.2f}% (teacher "
          f"{100 * r['teacher_val_accuracy']:.2f}%) after {r['steps']} steps, {r['seconds']:.0f} s "
          f"(results: {args.workdir}/distill.json)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher checkpoint into a fresh student")
    p.add_argument("--teacher", required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--student-preset", default="mu/4", help="any preset, e.g. mu/4, Ti/16")
    p.add_argument("--data", default="digits", help="'digits' or an image folder")
    p.add_argument("--val-data", default=None)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="t (big_vision default 1)")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="a in (1-a)*KL + a*CE with the hard labels (0: pure distillation)")
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                   help="adamw with --wd 0 is Adam")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="default 5%% of the steps")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_distill)
