"""Command-line plumbing that must hold for every sub-command: one-line argparse errors, values that
look like negative numbers (`--mesh -1x8`), and the `train` flags checked before any work.

Every bad flag ends as one line `vit22b CMD: error: CAUSE: FIX` and exit code 2, before a data
set is read or a work dir is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from vit22b.config import ConfigError, ModelConfig

# "-1x8", "-1X2", "4x-1": mesh-like values that argparse would take for an option.
_NEGATIVE_VALUE = re.compile(r"^-\d+[xX]-?\d+$")
MESH_PATTERN = re.compile(r"^-?\d+([xX]-?\d+)?$")


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (the usage block would bury the cause); sub-parsers made by
    `add_subparsers` inherit the class, so every command gets it."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """`--mesh -1x8` -> `--mesh=-1x8`. argparse treats any token starting with '-' that is not a
    plain negative number as an option, so `-1x8` would be "expected one argument"; the `=` form
    it always accepts."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if (token.startswith("--") and "=" not in token and i + 1 < len(argv)
                and _NEGATIVE_VALUE.match(argv[i + 1])):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _flag(dest: str) -> str:
    return "--" + dest.removeprefix("model_").replace("_", "-")


# dest -> (lowest allowed, lowest inclusive?, highest or None, example). Integers and floats alike;
# a float must also be finite (NaN compares false with everything, so it must be named).
_TRAIN_RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "steps": (1, True, None, "1500"),
    "batch_size": (1, True, None, "128"),
    "grad_accum": (1, True, None, "1"),
    "checkpoint_every": (1, True, None, "250"),
    "keep_checkpoints": (1, True, None, "3"),
    "eval_every": (0, True, None, "150 (0: only at the end)"),
    "log_every": (1, True, None, "50"),
    "val_fraction": (0, False, 1, "0.2"),
    "lr": (0, False, None, "1e-3"),
    "warmup": (0, True, None, "100"),
    "cooldown": (0, True, None, "300"),
    "timescale": (1, True, None, "100"),
    "wd": (0, True, None, "0.03"),
    "head_wd_mult": (0, True, None, "100"),
    "clip": (0, True, None, "1.0 (0: off)"),
    "image_size": (1, True, None, "16"),
    "label_smoothing": (0, True, 1, "0.1"),
    "seed": (0, True, 2**32, "0"),  # numpy and jax.random.key take any seed below 2^32
    "num_processes": (1, True, None, "2"),
    "process_id": (0, True, None, "0"),
    "data_workers": (0, True, None, "1 (0: in the training process)"),
    "model_norm_eps": (0, False, None, "1e-6"),
    "model_head_bias_init": (-math.inf, False, None, "-2.2"),
}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_value(flag: str, value: float, low: float, low_inclusive: bool, high: float | None,
                example: str) -> None:
    """One flag's value against its range; raises ConfigError naming the flag and a valid value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} {value}: must be a finite number, e.g. {flag} {example}")
    too_low = value < low if low_inclusive else value <= low
    too_high = high is not None and value >= high
    if too_low or too_high:
        bound = (f"in {'[' if low_inclusive else '('}{_num(low)}, {_num(high)})" if high is not None
                 else f"{'>=' if low_inclusive else '>'} {_num(low)}")
        raise ConfigError(f"{flag} {value}: must be {bound}, e.g. {flag} {example}")


def check_train_args(args: argparse.Namespace) -> None:
    """Every numeric `train` flag, the mesh's form and the flags that go together, checked before
    the data are read: a bad value costs nothing and writes nothing."""
    for dest, (low, inclusive, high, example) in _TRAIN_RANGES.items():
        value: Any = getattr(args, dest, None)
        if value is not None:
            check_value(_flag(dest), value, low, inclusive, high, example)
    if args.batch_size is not None and args.batch_size % args.grad_accum:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by --grad-accum "
                          f"{args.grad_accum}: use a batch size that is a multiple of it")
    if not MESH_PATTERN.match(args.mesh):
        raise ConfigError(f"--mesh {args.mesh!r}: write DATAxMODEL, e.g. 4x2 or -1x8")
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ConfigError("--coordinator, --num-processes and --process-id go together: give all three "
                          "(or --distributed for auto-detection)")
    if args.process_id is not None and args.num_processes is not None and \
            args.process_id >= args.num_processes:
        raise ConfigError(f"--process-id {args.process_id} with --num-processes {args.num_processes}: "
                          "process ids run from 0 to num_processes - 1")


# Model fields the data decide; not flags.
_PRESET_FIELDS = {"width", "depth", "mlp_dim", "num_heads", "patch_size"}
_DATA_FIELDS = {"num_classes", "in_channels", "image_size"}


def add_model_flags(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per ModelConfig field (the data decide classes, channels and size). The help shows
    what a run gets without the flag: the preset's size fields, else the field's default (the
    paper's choice; a data set's recipe or an --init checkpoint may set others). `only`: just
    these fields (fine-tuning changes how a checkpoint runs, not what it is)."""
    g = p.add_argument_group("model switches (defaults: the paper's choices, or the preset's)")
    for f in dataclasses.fields(ModelConfig):
        if f.name in _DATA_FIELDS or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = "the preset's (or the checkpoint's)" if f.name in _PRESET_FIELDS else f.default
        if f.type in ("bool", bool, "bool | None"):
            g.add_argument(flag, dest=f"model_{f.name}", action=argparse.BooleanOptionalAction,
                           default=None, help=f"default {default}")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            g.add_argument(flag, dest=f"model_{f.name}", type=kind, default=None,
                           help=f"default {default}")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {k[len("model_"):]: v for k, v in vars(args).items()
           if k.startswith("model_") and v is not None}
    if out.get("qk_norm_type") in ("none", "same"):
        out["qk_norm_type"] = None
    return out


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """How a training run executes, the same for train, finetune and distill: checkpoints,
    evaluation, logging, the device mesh and the processes."""
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--data-workers", type=int, default=None, help="processes decoding streamed images "
                   "(folders, prepare-data dirs; default: cores - 1, at most 8; 0: in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=None, help="default: every 10%% of the steps; "
                   "0: only at the end")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("scale-out (see README: multi-host)")
    g.add_argument("--mesh", default="-1x1", help="DATAxMODEL device mesh over all processes' "
                   "devices, -1 fills (e.g. 4x2, -1x8)")
    g.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with "
                   "auto-detection (SLURM, TPU pods, Open MPI)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields that `add_run_flags` set."""
    return dict(mesh=args.mesh, grad_accum=args.grad_accum, data_workers=args.data_workers,
                seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                progress=not args.no_progress)


def init_distributed(args: argparse.Namespace) -> None:
    """JAX's own multi-process runtime; nothing happens for a single process."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--coordinator, --num-processes and --process-id go together")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def _given(value: Any, default: Any) -> Any:
    """The flag's value if given (0 included: it must reach validation), else the default."""
    return default if value is None else value
