"""`vit22b fewshot`: big_vision's closed-form ridge-regression few-shot (`evaluators/fewshot_lsr.py`).

Protocol (defaults as `configs/common_fewshot.py`: pre_logits, shots 1/5/10/25, l2_reg 2^10,
3 seeds). Per seed, each class's train examples are put in a seeded random order and the k-shot
set is the first k of each class (so the 5-shot set contains the 1-shot set). Then:

1. whiten features with the few-shot set's mean and std (+1e-5);
2. append a constant bias feature 100 (large, so the bias is effectively unregularised);
3. targets: one-hot mapped to {-1, +1};
4. W = (X^T X + lambda I)^-1 X^T Y (primal, N >= D+1), or W = X^T (X X^T + lambda I)^-1 Y (dual,
   D+1 > N), both from one `eigh`, so every lambda in `--l2-reg` costs one matmul;
5. predict argmax(x W) on the whole val split (whitened with the same statistics).

Reported: accuracy per (shots, lambda, seed) and mean/std over seeds.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from vit22b.data import DataError
from vit22b.tasks import common

BIAS_CONSTANT = 100.0


def prepare(x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Whitening stats and the eigendecomposition that `solve` turns into W for any lambda."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    xb = whiten(x, mean, std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = xb.shape
    if n >= d:  # primal: eigh(X^T X) = Q diag(e) Q^T  ->  W = Q diag(1/(e+l)) Q^T X^T Y
        eigs, q = np.linalg.eigh(xb.T @ xb)
        lhs, rhs = q, q.T @ (xb.T @ targets)
    else:  # dual: eigh(X X^T) = Q diag(e) Q^T  ->  W = X^T Q diag(1/(e+l)) Q^T Y
        eigs, q = np.linalg.eigh(xb @ xb.T)
        lhs, rhs = xb.T @ q, q.T @ targets
    return {"mean": mean, "std": std, "eigs": eigs, "lhs": lhs, "rhs": rhs,
            "form": "primal" if n >= d else "dual"}


def whiten(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std with the constant bias column appended."""
    x = (np.asarray(x, np.float64) - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def solve(cache: dict[str, Any], l2_reg: float) -> np.ndarray:
    """The ridge weights [D+1, C] for one lambda."""
    return (cache["lhs"] / (cache["eigs"] + l2_reg)) @ cache["rhs"]


def fewshot_accuracy(cache: dict[str, Any], l2_reg: float, x_val: np.ndarray, y_val: np.ndarray) -> float:
    w = solve(cache, l2_reg)
    return float(np.mean(np.argmax(whiten(x_val, cache["mean"], cache["std"]) @ w, axis=1) == y_val))


def sample_shots(y: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` train examples per class: the first of a per-(seed, class) random order."""
    if shots <= 0:
        raise DataError(f"{shots}-shot: use a positive number of shots, e.g. --shots 1 5 10 25")
    counts = np.bincount(y, minlength=num_classes)
    if shots > counts.min():
        c = int(counts.argmin())
        raise DataError(f"class {c} has only {counts[c]} train example(s), too few for {shots}-shot: "
                        f"lower --shots to at most {counts[c]} or add examples")
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in range(num_classes)]
    return np.concatenate(idx)


def run_fewshot(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                num_classes: int, shots: list[int], seeds: list[int], l2_regs: list[float]) -> dict[str, Any]:
    """{"<k>shot": {"l2=<lambda>": {"mean", "std", "per_seed"}}} over the grid."""
    for k in shots:  # fail before any solve, naming the smallest class
        sample_shots(y_tr, num_classes, k, seeds[0])
    table: dict[str, Any] = {}
    for k in shots:
        accs = {lam: [] for lam in l2_regs}
        for seed in seeds:
            idx = sample_shots(y_tr, num_classes, k, seed)
            cache = prepare(x_tr[idx], y_tr[idx], num_classes)
            for lam in l2_regs:
                accs[lam].append(fewshot_accuracy(cache, lam, x_val, y_val))
        table[f"{k}shot"] = {f"l2={lam:g}": {"mean": float(np.mean(a)), "std": float(np.std(a)),
                                             "per_seed": a} for lam, a in accs.items()}
    return table


def cmd_fewshot(args: argparse.Namespace) -> int:
    model, dataset, adaptation = common.load_task(checkpoint=args.checkpoint, data=args.data,
                                                  image_size=args.image_size, val_data=args.val_data,
                                                  val_fraction=args.val_fraction)
    for k in args.shots:  # before the (slow) feature extraction
        sample_shots(dataset.train.labels, dataset.num_classes, k, args.seeds[0])
    fn = common.batch_fn(model, args.feature)
    progress = not args.no_progress
    x_tr, y_tr = common.run_batches(fn, dataset, "train", args.batch_size, progress, f"{args.feature} train")
    x_val, y_val = common.run_batches(fn, dataset, "val", args.batch_size, progress, f"{args.feature} val")
    table = run_fewshot(x_tr, y_tr, x_val, y_val, dataset.num_classes, args.shots, args.seeds, args.l2_reg)
    results = {"task": "fewshot", "checkpoint": str(args.checkpoint), "data": dataset.name,
               "image_size": dataset.image_size, "feature": args.feature,
               "feature_dim": int(x_tr.shape[1]), "val_examples": len(y_val), "seeds": args.seeds,
               "l2_regs": args.l2_reg, "chance": 1.0 / dataset.num_classes, "accuracy": table,
               "channel_adaptation": adaptation}
    rows = [f"few-shot ridge regression on {args.feature} ({x_tr.shape[1]}-d), {len(y_val)} val images, "
            f"seeds {args.seeds}:"]
    for shot, row in table.items():
        cells = ", ".join(f"{lam}: {100 * r['mean']:.2f} +- {100 * r['std']:.2f}%" for lam, r in row.items())
        rows.append(f"  {shot:>7}  {cells}")
    path = common.results_path("fewshot", checkpoint=args.checkpoint, out=args.out)
    return common.finish(results, path, "\n".join(rows))


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("fewshot", help="big_vision closed-form ridge few-shot on frozen features")
    common.add_common_args(p)
    p.add_argument("--feature", default="pre_logits", help="pre_logits | encoded-mean | block_i-mean")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--l2-reg", type=float, nargs="+", default=[1024.0], help="lambda(s); each reported")
    p.set_defaults(func=cmd_fewshot)
