"""`vit22b` command line: train, info, plan, plot, predict, import/export (timm, big_vision), transfer.

Every ModelConfig field is a flag (`--block sequential`, `--no-qk-norm`, `--norm layer`,
`--head gap`, `--qkv-bias` ...), so each of the paper's modifications is one flag away.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vit22b.cli_args import (
    OneLineParser,
    add_model_flags,
    add_run_flags,
    check_train_args,
    init_distributed,
    join_negative_values,
    model_overrides,
    run_fields,
)
from vit22b.config import ConfigError, preset
from vit22b.convert_cli import add_parsers as add_convert_parsers
from vit22b.plan_cli import add_plan_parser
from vit22b.recipes import effective_default

# Flags whose default is the data set's recipe: (flag, Recipe field, type, choices, what it sets).
_RECIPE_FLAGS: list[tuple[str, str, Any, list[str] | None, str]] = [
    ("--preset", "preset", str, None, "model preset, e.g. B/16"),
    ("--image-size", "image_size", int, None, "input resolution"),
    ("--steps", "steps", int, None, "training steps"),
    ("--batch-size", "batch_size", int, None, "global batch"),
    ("--loss", "loss", str, ["sigmoid", "softmax"], "sigmoid: JFT-style multi-label, as the paper"),
    ("--label-smoothing", "label_smoothing", float, None, "targets (1 - e) onehot + e / classes"),
    ("--augment", "augment", str, ["crop_flip", "flip", "none"],
     "training augmentation: random translation or crop, and flip (where the data allow)"),
    ("--optimizer", "optimizer", str, ["adafactor", "adamw", "sgd"], "the paper's is adafactor"),
    ("--lr", "learning_rate", float, None, "peak learning rate"),
    ("--schedule", "schedule", str, ["rsqrt", "cosine", "constant"], "learning-rate schedule"),
    ("--warmup", "warmup_fraction", int, None, "warm-up steps (the paper: 10k of 177k)"),
    ("--cooldown", "cooldown_fraction", int, None, "rsqrt cool-down steps (the paper: 30k of 177k)"),
    ("--wd", "weight_decay", float, None, "decoupled weight decay (x lr)"),
    ("--head-wd-mult", "head_wd_mult", float, None, "weight-decay multiplier of the head"),
]


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train (or resume) a model; no arguments: digits, in minutes")
    p.add_argument("--data", default="digits", help="'digits' (bundled), 'fashion-mnist' (Debian package "
                   "dataset-fashion-mnist), 'idx:DIR' (MNIST-format files), a `vit22b prepare-data` "
                   "directory, or an image folder (one sub-folder per class); in-memory data may end in "
                   "':classes=0-6' (names or indices) to keep only those classes")
    p.add_argument("--val-data", default=None, help="held-out image folder (default: a split)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out share of a folder's images (default 0.2; 0.1 with --holdout train)")
    p.add_argument("--holdout", choices=["test", "train"], default="test",
                   help="MNIST-format data: evaluate on the test split, or on a held-out part of the "
                   "training images (for choosing a recipe without touching the test split)")
    g = p.add_argument_group("recipe (unset flags: the data set's recipe in recipes.py, else the paper's)")
    for flag, field, kind, choices, what in _RECIPE_FLAGS:
        g.add_argument(flag, type=kind, choices=choices, default=None,
                       help=f"{what} (default {effective_default(field)})".replace("%", "%%"))
    g.add_argument("--timescale", type=int, default=None, help="rsqrt timescale (default = warmup)")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--no-augment", action="store_true", help="the same as --augment none")
    p.add_argument("--workdir", default=None, help="default workdirs/<data name>")
    p.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="start from these weights (a model dir from train/finetune/import, or a "
                   ".safetensors): its config is the model's, model flags on top; posemb resampled to "
                   "--image-size, a new zero head when the classes differ")
    add_run_flags(p)
    add_model_flags(p)
    p.set_defaults(func=cmd_train)


def _given(value: Any, default: Any) -> Any:
    """The flag's value if given (0 included: it must reach validation), else the default."""
    return default if value is None else value


def cmd_train(args: argparse.Namespace) -> int:
    from vit22b.data import load_dataset
    from vit22b.recipes import recipe_for, train_config_for
    from vit22b.train import train

    check_train_args(args)  # before any work: a bad flag costs nothing and writes nothing
    init_distributed(args)
    recipe = recipe_for(args.data)
    val_fraction = _given(args.val_fraction, 0.1 if args.holdout == "train" else 0.2)
    dataset = load_dataset(args.data, _given(args.image_size, recipe.image_size), val_path=args.val_data,
                           val_fraction=val_fraction, seed=args.seed, holdout=args.holdout)
    flags = {"optimizer": args.optimizer, "learning_rate": args.lr, "schedule": args.schedule,
             "warmup_steps": args.warmup, "cooldown_steps": args.cooldown, "timescale": args.timescale,
             "weight_decay": args.wd, "head_wd_mult": args.head_wd_mult, "grad_clip_norm": args.clip}
    cfg = train_config_for(dataset, args.data, preset_name=args.preset, init_from=args.init,
                           steps=args.steps, model=model_overrides(args),
                           optim={k: v for k, v in flags.items() if v is not None},
                           workdir=args.workdir, val_data=args.val_data, val_fraction=val_fraction,
                           holdout=args.holdout, batch_size=args.batch_size, loss=args.loss,
                           label_smoothing=args.label_smoothing,
                           augment="none" if args.no_augment else args.augment,
                           **run_fields(args))
    model_cfg = cfg.model
    print(f"training {args.init or args.preset or recipe.preset} ({model_cfg.width}w x {model_cfg.depth}d, "
          f"{model_cfg.image_size}px, patch {model_cfg.patch_size}"
          + (f", {model_cfg.conv_stem_channels}-channel conv stem" if model_cfg.conv_stem_channels else "")
          + f") on {dataset.name}: "
          f"{dataset.train_size} train / {dataset.val_size} held-out images, "
          f"{dataset.num_classes} classes -> {cfg.workdir}")
    result = train(cfg, dataset)
    print(f"held-out accuracy: {100 * result['eval_accuracy']:.2f}% on {result['eval_examples']} "
          f"images after {result['steps']} steps, {result['seconds']:.0f} s "
          f"(results: {cfg.workdir}/final.json)")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from vit22b.records import prepare

    info = prepare(args.src, args.out, val_src=args.val, val_fraction=args.val_fraction,
                   seed=args.seed, images_per_shard=args.images_per_shard)
    counts = ", ".join(f"{k} {v['count']} images in {len(v['shards'])} shard(s)"
                       for k, v in info["splits"].items())
    print(f"wrote {args.out}: {len(info['classes'])} classes, {counts}; {info['skipped_files']} unreadable "
          f"file(s) skipped. Train with: vit22b train --data {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from vit22b.flops import flops_per_image
    from vit22b.model import abstract_model, split_params
    from vit22b.weights import flatten

    fields: dict[str, Any] = {"num_classes": args.num_classes}
    if args.image_size is not None:
        fields["image_size"] = args.image_size
    cfg = preset(args.preset, **fields, **model_overrides(args))
    _, params = split_params(abstract_model(cfg))
    sizes = {k: int(np.prod(v.shape)) for k, v in flatten(params).items()}
    kernels = ("encoder/in_kernel", "encoder/out_kernel", "encoder/qkv_kernel",
               "encoder/attn_out_kernel", "encoder/mlp_in_kernel", "encoder/mlp_out_kernel")
    flops = flops_per_image(cfg)
    info = {"preset": args.preset, "width": cfg.width, "depth": cfg.depth, "mlp_dim": cfg.mlp_dim,
            "num_heads": cfg.num_heads, "patch_size": cfg.patch_size, "image_size": cfg.image_size,
            "tokens": cfg.num_patches, "params_total": sum(sizes.values()),
            "params_block_kernels": sum(v for k, v in sizes.items() if k in kernels),
            "flops_per_image_forward": flops["forward"], "flops_per_image_train": flops["train"]}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v:,}" if isinstance(v, int) else f"{k:>24}: {v}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from vit22b.metrics import plot_metrics

    print(plot_metrics(args.workdir, args.out))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from vit22b.api import load_model
    from vit22b.inputs import load_input_npy

    if args.batch_size < 1 or args.top_k < 1:
        raise ConfigError(f"--batch-size {args.batch_size} / --top-k {args.top_k}: both must be >= 1")
    model = load_model(args.checkpoint, **({"dtype_mm": args.dtype_mm} if args.dtype_mm else {}))
    cfg = model.cfg
    jitted = jax.jit(lambda x: model(x)[0])

    def forward(x: np.ndarray) -> np.ndarray:
        logits = np.asarray(jitted(x))
        if not np.isfinite(logits).all():  # finite inputs and weights were checked: a model overflow
            raise ValueError(f"the model gave NaN/Inf logits on finite inputs: try --dtype-mm float32 "
                             f"(checkpoint {args.checkpoint})")
        return logits

    if args.input_npy:
        x = load_input_npy(args.input_npy, cfg.image_size, cfg.in_channels,
                           float_range=not args.any_float_range)
        logits = np.concatenate([forward(x[i:i + args.batch_size])
                                 for i in range(0, len(x), args.batch_size)])
        np.save(args.output_npy or "logits.npy", logits)
        print(f"wrote {args.output_npy or 'logits.npy'}: logits {logits.shape}")
        return 0
    if not args.images:
        raise SystemExit("predict: give image files, or --input-npy X.npy")
    from vit22b.data import load_image

    classes_file = Path(args.checkpoint) / "classes.json"
    names = json.loads(classes_file.read_text()) if classes_file.exists() else None
    images = np.stack([load_image(p, cfg.image_size, cfg.in_channels) for p in args.images])
    logits = forward(images)
    for path, row in zip(args.images, logits, strict=True):
        top = np.argsort(-row)[: args.top_k]
        shown = ", ".join(f"{names[i] if names else i} ({row[i]:.2f})" for i in top)
        print(f"{path}: {shown}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vit22b", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    add_plan_parser(sub)

    p = sub.add_parser("prepare-data", help="image folder -> sharded ArrayRecord files for fast training")
    p.add_argument("src", help="folder with one sub-folder per class")
    p.add_argument("--out", required=True, help="new directory for the shards")
    p.add_argument("--val", default=None, help="a val folder with the same classes")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="without --val: hold out this share of SRC as the val split (0: none)")
    p.add_argument("--images-per-shard", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("info", help="parameter count and FLOPs of a preset")
    p.add_argument("preset")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    add_model_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="loss/accuracy curves of a work dir, to PNG")
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="default WORKDIR/metrics.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("predict", help="run a checkpoint on images or an .npy array")
    p.add_argument("--checkpoint", required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--input-npy", default=None, help="images [N, S, S, C]: float in [-1, 1] (as "
                   "trained) or uint8 0..255 (scaled as in training); anything else is refused")
    p.add_argument("--output-npy", default=None)
    p.add_argument("--any-float-range", action="store_true", help="float inputs of any finite range (a "
                   "model imported with another normalisation, e.g. timm's ImageNet mean/std)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--dtype-mm", choices=["bfloat16", "float32"], default=None,
                   help="matmul input dtype (default: the checkpoint's; float32 for exact numerics)")
    p.add_argument("images", nargs="*")
    p.set_defaults(func=cmd_predict)

    add_convert_parsers(sub)

    # Transfer tasks on frozen or fine-tuned checkpoints (vit22b/tasks/): each registers itself.
    from vit22b.tasks import depth, distill, fewshot, finetune, lit, probe, robustness, segment, video
    for task in (probe, fewshot, finetune, distill, robustness, lit, segment, depth, video):
        task.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    from vit22b.checkpoint import CheckpointError
    from vit22b.data import DataError
    from vit22b.interrupt import TrainingInterrupted
    from vit22b.train import TrainingError
    from vit22b.weights import WeightsError
    from vit22b.workdir import WorkdirError

    try:
        return args.func(args)
    except (ConfigError, DataError, WeightsError, CheckpointError, TrainingError, WorkdirError,
            FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"vit22b {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # saved and said so: 130 (SIGINT) / 143 (SIGTERM)
        return e.exit_code
    except KeyboardInterrupt:  # outside the training loop (e.g. while loading): nothing to save
        print(f"vit22b {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
