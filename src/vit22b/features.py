"""Frozen features from a model, read by name from its intermediates (model.py's `out` dict).

The transfer tasks (probe, few-shot, dense heads, video, LiT) all start here: they never edit the
model, they ask for `pre_logits` (the pooled representation), `encoded` (patch tokens after the
final norm), `block_i`, ...
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from vit22b.data import ImageDataset
from vit22b.model import ViT


def feature_fn(model: ViT, feature: str = "pre_logits", return_layers: tuple[int, ...] = ()):
    """A jitted images [B, H, W, C] -> features function for the named intermediate."""

    @jax.jit
    def forward(images: jax.Array) -> jax.Array:
        _, out = model(images, return_layers=return_layers)
        if feature not in out:
            raise KeyError(f"no intermediate {feature!r}: the model returns {sorted(out)} "
                           "(ask for block_i with return_layers=(i,))")
        return out[feature]

    return forward


def extract(model: ViT, batches: Iterable[dict[str, np.ndarray]], feature: str = "pre_logits",
            return_layers: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) over batches that carry "image", "label" and optionally "mask"."""
    forward = feature_fn(model, feature, return_layers)
    feats, labels = [], []
    for batch in batches:
        keep = batch.get("mask", np.ones(len(batch["label"]), bool))
        feats.append(np.asarray(forward(batch["image"]), np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(feats), np.concatenate(labels)


def dataset_features(model: ViT, dataset: ImageDataset, split: str = "train",
                     feature: str = "pre_logits", batch_size: int = 256,
                     return_layers: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Features of every example of a split, in order, without augmentation."""
    return extract(model, dataset.eval_batches(batch_size, split=split), feature, return_layers)
