"""Knowledge distillation: a frozen teacher checkpoint -> a fresh student of any preset.

Distillation is `vit22b train` with the teacher as a frozen input of the step (TrainConfig.teacher):
sharded by the same rule table as the student, forward only, its matmuls in bfloat16
(`--teacher-dtype`), no gradients and no optimizer state. Protocol (big_vision
`trainers/proj/distill`, "patient and consistent" function matching, Beyer et al. 2022): each
step draws ONE augmented batch and teacher and student both see that same view (resized to the
teacher's resolution when the two differ); the loss is big_vision's `dist(kind='kl')`:

    KL_t = t^2 * mean_batch sum_c softmax(teacher/t)_c * (log_softmax(teacher/t) - log_softmax(student/t))_c

optionally mixed with the hard-label loss: loss = (1 - a) * KL_t + a * CE(student, labels)
(`--label-weight a`; a = 1 is plain label training with the identical pipeline, the baseline).
The student is freshly initialised (zero head), trained with adamw (no weight decay) or
adafactor, cosine schedule with warm-up, clip 1.0, on any `--mesh`, resumable.

    vit22b distill --teacher W_T --student-preset mu/4 --data digits --workdir OUT --steps 500

writes OUT/model.safetensors + config.json + classes.json + final.json + distill.json
(+ checkpoints/, metrics.jsonl with train/kl and train/ce).
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

from vit22b.cli_args import add_model_flags, model_overrides
from vit22b.config import ModelConfig, preset
from vit22b.data import ImageDataset
from vit22b.optim import OptimConfig
from vit22b.tasks.common import TaskError
from vit22b.tasks.finetune import add_transfer_flags, start_transfer, transfer_optim
from vit22b.train import TrainConfig, train
from vit22b.weights import read_config


def student_config(student_preset: str, dataset: ImageDataset, **overrides: Any) -> ModelConfig:
    """The preset at the data's resolution, channels and classes; fresh zero head."""
    fields = dict(image_size=dataset.image_size, in_channels=dataset.in_channels,
                  num_classes=dataset.num_classes, head_bias_init=0.0)
    return preset(student_preset, **{**fields, **overrides})


def distill(teacher_checkpoint: str | Path, student_preset: str, dataset: ImageDataset,
            workdir: str | Path | None, *, steps: int = 500, batch_size: int = 64,
            temperature: float = 1.0, label_weight: float = 0.0, optim: OptimConfig | None = None,
            student_overrides: dict[str, Any] | None = None, teacher_dtype: str = "bfloat16",
            **run: Any) -> dict[str, Any]:
    """Distil the teacher into a fresh `student_preset` model on `dataset`'s train stream, with
    `vit22b train`'s loop. `run`: TrainConfig's execution fields (mesh, seed, augment, ...).
    Without a `workdir` the run's files go to a temporary directory removed afterwards."""
    t0 = time.time()
    if read_config(teacher_checkpoint) is None:
        raise TaskError(f"teacher {teacher_checkpoint} carries no vit22b config")
    model = student_config(student_preset, dataset, **(student_overrides or {}))
    optim = optim or transfer_optim("adamw", 3e-3, max(1, steps // 20))
    with tempfile.TemporaryDirectory() as scratch_dir:
        cfg = TrainConfig(model=model, optim=optim, workdir=str(workdir or scratch_dir),
                          data=dataset.name, steps=steps, batch_size=batch_size, loss="softmax",
                          teacher=str(teacher_checkpoint), distill_temperature=temperature,
                          distill_label_weight=label_weight, teacher_dtype=teacher_dtype, **run)
        r = train(cfg, dataset)
    result = {
        "student_val_accuracy": r["eval_accuracy"], "teacher_val_accuracy": r["teacher_eval_accuracy"],
        "steps": steps, "seconds": time.time() - t0, "teacher_checkpoint": str(teacher_checkpoint),
        "student_preset": student_preset, "temperature": temperature, "label_weight": label_weight,
        "teacher_dtype": teacher_dtype, "batch_size": batch_size, "seed": cfg.seed, "mesh": cfg.mesh,
        "data": dataset.name, "resumed_from": r["resumed_from"], "optim": dataclasses.asdict(optim),
    }
    if workdir and jax.process_index() == 0:  # the process that writes the run's files
        (Path(workdir) / "distill.json").write_text(json.dumps(result, indent=2))
    return result


def cmd_distill(args: argparse.Namespace) -> int:
    teacher = read_config(args.teacher)
    if teacher is None:
        raise TaskError(f"teacher {args.teacher} carries no vit22b config")
    dataset, run = start_transfer(args, args.image_size or teacher.image_size)
    print(f"distilling {args.teacher} -> {args.student_preset} on {dataset.name} "
          f"(t={args.temperature}, label weight {args.label_weight}) -> {args.workdir}")
    r = distill(args.teacher, args.student_preset, dataset, args.workdir,
                temperature=args.temperature, label_weight=args.label_weight,
                teacher_dtype=args.teacher_dtype, student_overrides=model_overrides(args), **run)
    teacher_pct, student_pct = 100 * r["teacher_val_accuracy"], 100 * r["student_val_accuracy"]
    print(f"student val accuracy {student_pct:.2f}% (teacher {teacher_pct:.2f}%) after {r['steps']} "
          f"steps, {r['seconds']:.0f} s (results: {args.workdir}/distill.json)")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher checkpoint into a fresh student "
                              "(`train` with a frozen teacher, any --mesh, resumable)")
    add_transfer_flags(p, "--teacher", ["adamw", "adafactor"], lr=3e-3, steps=500)
    p.add_argument("--student-preset", default="mu/4", help="any preset, e.g. mu/4, Ti/16, B/16")
    p.add_argument("--image-size", type=int, default=None, help="the student's (default: the "
                   "teacher's); the teacher sees each batch resized to its own")
    p.add_argument("--temperature", type=float, default=1.0, help="t (big_vision default 1)")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="a in (1-a)*KL + a*CE with the hard labels (0: pure distillation)")
    p.add_argument("--teacher-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="the teacher's matmuls (its params stay float32)")
    add_model_flags(p)
    p.set_defaults(func=cmd_distill)
