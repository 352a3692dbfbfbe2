"""`vit22b robustness`: classifier accuracy under distribution shift, and calibration.

Protocol. The checkpoint's own classifier logits (it must have a head: num_classes > 0, matching the
data's classes) are computed on the val split unchanged ("identity") and on shifted copies of
every eval batch, made with numpy/scipy.ndimage on images in [-1, 1]:

- rotate_<deg>: rotation about the centre, bilinear, borders filled with the nearest pixel;
- noise_<sigma>: additive Gaussian noise (sigma in [-1, 1] units; seeded), clipped to [-1, 1];
- blur_<sigma>: Gaussian blur over the two spatial axes (sigma in pixels);
- contrast_<f>: each image's mean + f * (image - mean).

Calibration: probabilities are softmax(logits) (also for sigmoid-trained checkpoints: their
ranking is what the softmax sees). ECE uses 15 equal-width bins over the max probability,
ECE = sum_b |b|/N * |acc(b) - conf(b)|. A temperature T is fit by minimising the val NLL of
softmax(logits / T) (bounded 1-D search over log T) on one half of the val split (a seeded random
half), and ECE and NLL before and after are reported on the other half: a held-out gain, not how
much of the same images' miscalibration one scalar can absorb.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from scipy import ndimage, optimize
from scipy.special import log_softmax, softmax

from vit22b.data import DataError
from vit22b.tasks import common
from vit22b.tasks.common import TaskError

Shift = Callable[[np.ndarray], np.ndarray]


def rotate(degrees: float) -> Shift:
    return lambda x: ndimage.rotate(x, degrees, axes=(1, 2), reshape=False, order=1, mode="nearest")


def noise(sigma: float, seed: int = 0) -> Shift:
    rng = np.random.default_rng(seed)  # batches come in order: the same noise every run

    def apply(x: np.ndarray) -> np.ndarray:
        return np.clip(x + sigma * rng.standard_normal(x.shape, np.float32), -1.0, 1.0)
    return apply


def blur(sigma: float) -> Shift:
    return lambda x: ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")


def contrast(factor: float) -> Shift:
    def apply(x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return mean + factor * (x - mean)
    return apply


def default_shifts() -> dict[str, Shift | None]:
    return {"identity": None, "rotate_15": rotate(15), "rotate_30": rotate(30), "noise_0.1": noise(0.1),
            "noise_0.3": noise(0.3), "blur_1": blur(1.0), "contrast_0.5": contrast(0.5)}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width bins over the max probability."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # bin b holds (b/B, (b+1)/B]
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """argmin_T NLL(softmax(logits / T)), a bounded scalar search over log T in [log 0.01, log 100]."""
    res = optimize.minimize_scalar(lambda t: nll(logits, labels, float(np.exp(t))),
                                   bounds=(np.log(0.01), np.log(100.0)), method="bounded",
                                   options={"xatol": 1e-5})
    return float(np.exp(res.x))


def calibration(logits: np.ndarray, labels: np.ndarray, t: float | None = None) -> dict[str, float]:
    """ECE and NLL before and after temperature t (default: fit on these logits)."""
    t = fit_temperature(logits, labels) if t is None else t
    return {"temperature": t, "ece": ece(softmax(logits, axis=1), labels),
            "ece_scaled": ece(softmax(logits / t, axis=1), labels),
            "nll": nll(logits, labels), "nll_scaled": nll(logits, labels, t)}


def held_out_calibration(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """T fit on a random half of the examples; ECE/NLL before and after on the other half."""
    order = np.random.default_rng(seed).permutation(len(labels))
    fit, report = order[: len(order) // 2], order[len(order) // 2:]
    t = fit_temperature(logits[fit], labels[fit])
    return {**calibration(logits[report], labels[report], t), "fit_examples": len(fit),
            "report_examples": len(report)}


def cmd_robustness(args: argparse.Namespace) -> int:
    model, dataset, adaptation = common.load_task(checkpoint=args.checkpoint, data=args.data,
                                                  image_size=args.image_size, val_data=args.val_data,
                                                  val_fraction=args.val_fraction)
    cfg = model.cfg
    if not cfg.num_classes:
        raise TaskError(f"{args.checkpoint} has no classifier (num_classes=0): robustness needs class "
                        "logits; fine-tune a head first, or use `vit22b probe` / `vit22b fewshot`")
    if cfg.num_classes != dataset.num_classes:
        raise DataError(f"the checkpoint's classifier has {cfg.num_classes} classes but {dataset.name!r} "
                        f"has {dataset.num_classes}: evaluate on the data it was trained for")
    logits_fn = jax.jit(lambda x: model(x)[0])
    results: dict[str, Any] = {"task": "robustness", "checkpoint": str(args.checkpoint),
                               "data": dataset.name, "image_size": dataset.image_size,
                               "val_examples": dataset.val_size, "shifts": {},
                               "channel_adaptation": adaptation}
    for name, shift in default_shifts().items():
        logits, labels = common.run_batches(logits_fn, dataset, "val", args.batch_size, not args.no_progress,
                                            name, transform=shift)
        acc = float(np.mean(logits.argmax(1) == labels))
        results["shifts"][name] = {"accuracy": acc, "ece": ece(softmax(logits, axis=1), labels)}
        if name == "identity":
            results["calibration"] = held_out_calibration(logits, labels)
    rows = [f"robustness of {args.checkpoint} on {dataset.name} ({dataset.val_size} val images):"]
    for name, r in results["shifts"].items():
        rows.append(f"  {name:>13}: accuracy {100 * r['accuracy']:6.2f}%  ECE {r['ece']:.4f}")
    c = results["calibration"]
    rows.append(f"  calibration (identity; T fit on {c['fit_examples']} images, reported on the other "
                f"{c['report_examples']}): ECE {c['ece']:.4f} -> {c['ece_scaled']:.4f}, "
                f"NLL {c['nll']:.4f} -> {c['nll_scaled']:.4f} at temperature T={c['temperature']:.3f}")
    return common.finish(results, common.results_path("robustness", checkpoint=args.checkpoint, out=args.out),
                         "\n".join(rows))


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("robustness", help="accuracy under shifts + ECE before/after temperature")
    common.add_common_args(p)
    p.set_defaults(func=cmd_robustness)
