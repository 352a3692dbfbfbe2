"""What the transfer commands share: the frozen backbone, named features, batched application,
standardisation, the fitter of the small heads trained on frozen features, and where results go.

Loading reads the checkpoint's config from the weights file's header (`weights.read_config`),
checks the requested image size and the data against it, and only then reads the weights, once.

`fit_head` trains every cheap head (probe's linear classifier, LiT's towers, the dense decoders and
the video heads, those two through `fit_module`) the same way: AdamW (decoupled weight decay on
matrices only, optional global-norm clip), linear warm-up from 0 then cosine decay to 0 at the last
step, one jitted update per step with one progress bar, and a non-finite loss stops the run with a
`TaskError` naming the fix.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from vit22b import weights
from vit22b.config import ModelConfig
from vit22b.data import ImageDataset, load_dataset, load_digits_dataset
from vit22b.model import ViT, abstract_model, split_params

TOKEN_FEATURES = ("stem", "with_posemb", "encoded")


class TaskError(ValueError):
    """A transfer command that cannot run as asked: the message names the cause and the fix."""


# ----------------------------------------------------------------------------- arguments
def add_backbone_args(p: argparse.ArgumentParser, *, data: str, data_help: str) -> None:
    """--checkpoint, --data, --val-fraction, --image-size, --out, --no-progress."""
    p.add_argument("--checkpoint", required=True, help="model dir (model.safetensors + config.json)")
    p.add_argument("--data", default=data, help=data_help)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="held out when the data has no val split of its own")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the checkpoint's (another size resamples the position embedding)")
    p.add_argument("--out", default=None,
                   help="results JSON (default WORKDIR/<task>.json, else CHECKPOINT/<task>.json)")
    p.add_argument("--no-progress", action="store_true")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The backbone arguments on image-classification data, plus --val-data and --batch-size."""
    add_backbone_args(p, data="digits", data_help="'digits', 'fashion-mnist', 'idx:DIR', a prepare-data "
                      "directory or an image folder (one sub-folder per class); channels are adapted "
                      "to the checkpoint's (gray <-> RGB)")
    p.add_argument("--val-data", default=None, help="held-out image folder (default: a split of --data)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")


# ----------------------------------------------------------------------------- loading
def checkpoint_at(checkpoint: str | Path, image_size: int | None) -> tuple[ModelConfig, int]:
    """The checkpoint's config (from the file's header) and the image size to run it at, checked."""
    cfg = weights.read_config(checkpoint)
    if cfg is None:
        raise TaskError(f"{checkpoint} has no config.json: pass a model dir written by "
                        "`vit22b train` or `vit22b import-timm`")
    size = cfg.image_size if image_size is None else image_size
    if size <= 0 or size % cfg.patch_size:
        fix = max(1, round(size / cfg.patch_size)) * cfg.patch_size
        raise TaskError(f"--image-size {size} is not a positive multiple of the checkpoint's patch size "
                        f"{cfg.patch_size}: use e.g. {fix}")
    return cfg, size


def _read_model(checkpoint: str | Path, cfg: ModelConfig) -> ViT:
    """The weights (read once) fitted to `cfg`: another image size resamples the position embedding
    in 2-D, other input channels adapt the patch kernel (weights.adapt_input_channels)."""
    from vit22b.api import model_from_params

    flat, _ = weights.read_safetensors(weights.weights_path(checkpoint))
    _, expected = split_params(abstract_model(cfg))
    return model_from_params(cfg, weights.fit_weights(flat, expected))


def load_backbone(checkpoint: str | Path, image_size: int | None = None) -> ViT:
    """The checkpoint at `image_size` (default its own), with clear errors for a bad size."""
    cfg, size = checkpoint_at(checkpoint, image_size)
    return _read_model(checkpoint, cfg.replace(image_size=size))


def load_task(*, checkpoint: str | Path, data: str, image_size: int | None = None,
              val_data: str | None = None, val_fraction: float = 0.2
              ) -> tuple[ViT, ImageDataset, str | None]:
    """(model, dataset, channel adaptation or None): the dataset is loaded and checked against the
    checkpoint's config before the weights are read."""
    cfg, size = checkpoint_at(checkpoint, image_size)
    dataset = load_dataset(data, size, val_path=val_data, val_fraction=val_fraction)
    model = _read_model(checkpoint, cfg.replace(image_size=size, in_channels=dataset.in_channels))
    return model, dataset, channel_adaptation(cfg.in_channels, dataset.in_channels)


def channel_adaptation(checkpoint_channels: int, data_channels: int) -> str | None:
    """What loading does when the checkpoint and the data disagree on channels (reported in JSON)."""
    if checkpoint_channels == data_channels:
        return None
    if data_channels == 1:
        return (f"{checkpoint_channels}-channel patch kernel summed over channels "
                "(= gray images replicated to RGB)")
    return f"1-channel patch kernel repeated over {data_channels} channels and scaled 1/{data_channels}"


# ----------------------------------------------------------------------------- generated data
_digits = functools.lru_cache(maxsize=2)(load_digits_dataset)  # per size: scenes and clips share it


def digit_glyphs(split: str, digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [M, s, s] upsampled digits and their labels int32 [M] from the digits' train or val split:
    what the generated dense scenes and clips are drawn from (val data from held-out glyphs)."""
    ds = _digits(digit_size)
    part = ds.train if split == "train" else ds.val
    assert part.images is not None
    return part.images[..., 0], part.labels


# ----------------------------------------------------------------------------- named features
def available_features(model: ViT) -> list[str]:
    depth = model.cfg.depth
    blocks = ["block_0-mean"] + ([f"block_{depth - 1}-mean"] if depth > 1 else [])
    pooled = ["pre_logits"] if model.cfg.head != "none" else []
    return pooled + [f"{n}-mean" for n in TOKEN_FEATURES] + [" .. ".join(blocks) + " (block_i-mean)"]


def parse_feature(model: ViT, name: str, *, tokens: bool = False) -> tuple[str, bool, tuple[int, ...]]:
    """'pre_logits' | '<token feature>-mean' | 'block_i-mean' (with `tokens`, also the token features
    themselves) -> (intermediate, mean over tokens, return_layers); a TaskError naming the available
    ones otherwise."""
    base, pooled = (name[:-5], True) if name.endswith("-mean") else (name, False)
    m = re.fullmatch(r"block_(\d+)", base)
    known = base in TOKEN_FEATURES or (m is not None and int(m.group(1)) < model.cfg.depth)
    ok = ((pooled or tokens) and known) or (not pooled and base == "pre_logits" and model.cfg.head != "none")
    if not ok:
        raise TaskError(f"--feature {name!r} is not one this model produces: use one of "
                        f"{', '.join(available_features(model))} (token features "
                        f"{'also without' if tokens else 'need'} '-mean'; "
                        f"the model has {model.cfg.depth} blocks, head {model.cfg.head!r})")
    return base, pooled, (int(m.group(1)),) if m else ()


def batch_fn(model: ViT, name: str, *, tokens: bool = False) -> Callable[[np.ndarray], jax.Array]:
    """A jitted images -> [B, D] function for a feature name (see `parse_feature`); with `tokens`,
    a token feature without '-mean' gives [B, P, D]."""
    from vit22b.features import feature_fn

    base, pooled, layers = parse_feature(model, name, tokens=tokens)
    forward = feature_fn(model, base, layers)
    return jax.jit(lambda x: jnp.mean(forward(x), axis=1)) if pooled else forward


# ----------------------------------------------------------------------------- batched application
def run_batches(fn: Callable[[np.ndarray], Any], dataset: ImageDataset, split: str, batch_size: int,
                progress: bool, desc: str,
                transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fn(images) over a split, labels) in order, padding dropped; `transform` edits each batch."""
    n = dataset.train_size if split == "train" else dataset.val_size
    outs, labels = [], []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in dataset.eval_batches(batch_size, split=split):
            images = batch["image"] if transform is None else transform(batch["image"])
            keep = batch["mask"]
            outs.append(np.asarray(fn(images), np.float32)[keep])
            labels.append(batch["label"][keep])
            bar.update(int(keep.sum()))
    return np.concatenate(outs), np.concatenate(labels)


def apply_batched(fn: Callable[[np.ndarray], Any], items: Sequence[Any] | np.ndarray, batch_size: int, *,
                  prepare: Callable[[Any], np.ndarray] | None = None, dtype: Any = None,
                  progress: bool = False, desc: str = "", unit: str = "img") -> np.ndarray:
    """fn over `items` in batches, concatenated. `prepare` turns a slice of items into an array
    (load or normalise images). The last batch is padded with zeros to `batch_size`, so one
    compiled shape serves all, and the padding's outputs are dropped."""
    batch_size = min(batch_size, len(items))
    out = []
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            x = items[start:start + batch_size]
            x = np.asarray(x) if prepare is None else prepare(x)
            n = len(x)
            if n < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
            out.append(np.asarray(fn(x), dtype)[:n])
            bar.update(n)
    return np.concatenate(out)


def predict(module: nnx.Module, x: np.ndarray, batch_size: int = 512, *,
            post: Callable[[jax.Array], jax.Array] | None = None, dtype: Any = np.float32) -> np.ndarray:
    """post(module(x)) (default the outputs themselves) in batches, see `apply_batched`."""
    graphdef, state = nnx.split(module)
    post = post or (lambda y: y)
    forward = jax.jit(lambda s, xb: post(nnx.merge(graphdef, s)(xb)))  # weights as an argument, not constants
    return apply_batched(lambda xb: forward(state, xb), x, batch_size, dtype=dtype)


def standardise(train: np.ndarray, *others: np.ndarray, axes: tuple[int, ...] = (0,)
                ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Each array standardised (float32) with the train array's mean and std (+1e-6) over `axes`
    (axis 0, the examples, always among them); also returns (mean, std) without the example axis,
    to standardise later data or to save beside a head."""
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-6
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)], (mean[0], std[0])


# ----------------------------------------------------------------------------- the head fitter
def fit_head(loss_fn: Callable[[Any, Any, Any], jax.Array], params: Any, *, steps: int, lr: float,
             data: Any = None, inputs: Callable[[int, int], Any] | None = None, warmup: int | None = None,
             wd: float = 0.0, clip: float | None = None, progress: bool = False, desc: str = "head",
             chunk: int = 50) -> tuple[Any, np.ndarray]:
    """Train `params` (any pytree) on loss_fn(params, data, step input); returns (params, the loss of
    every step, float64 [steps]).

    `data` (a pytree of arrays) enters the jitted step as an argument, not as constants;
    `inputs(start, stop)` gives the inputs of steps start..stop-1 stacked on a leading axis (default:
    the step numbers, from which a loss can draw its own batch). The schedule is the module
    docstring's, warm-up over min(warmup, steps - 1) steps (default 5% of the steps)."""
    if steps < 1:
        raise TaskError(f"--steps {steps}: train for at least 1 step")
    # One flat parameter vector: Adam, the decay and the clip are elementwise or global, so this is
    # the same update as on the tree, but XLA compiles the optimiser for one array instead of one
    # per leaf (seconds on CPU for a decoder's ~40 leaves).
    flat, unravel = ravel_pytree(params)
    matrices, _ = ravel_pytree(jax.tree.map(lambda p: jnp.full(jnp.shape(p), float(jnp.ndim(p) >= 2)),
                                            params))
    warmup = max(1, steps // 20) if warmup is None else warmup
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps)
    tx = optax.chain(*([optax.clip_by_global_norm(clip)] if clip else []), optax.scale_by_adam(),
                     *([optax.add_decayed_weights(wd * matrices)] if wd else []),
                     optax.scale_by_learning_rate(schedule))
    inputs = inputs or (lambda start, stop: np.arange(start, stop, dtype=np.int32))

    # One jitted step per step, not a lax.scan over a chunk of steps: XLA:CPU runs convolutions
    # inside a while loop on a slow path (a DPT decoder's step took 2.5 s in a scan, 0.19 s alone).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p: jax.Array, opt: Any, data: Any, x: Any) -> tuple[jax.Array, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda q: loss_fn(unravel(q), data, x))(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt, losses = tx.init(flat), []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for start in range(0, steps, chunk):  # the losses of a chunk are fetched (one sync) at once
            stop = min(start + chunk, steps)
            xs, chunk_losses = inputs(start, stop), []
            for i in range(stop - start):
                flat, opt, loss = step(flat, opt, data, jax.tree.map(lambda a, i=i: a[i], xs))
                chunk_losses.append(loss)
            last = np.asarray(jax.device_get(chunk_losses), np.float64)
            bad = np.flatnonzero(~np.isfinite(last))
            if bad.size:
                raise TaskError(f"the {desc} loss became {last[bad[0]]} at step {start + bad[0] + 1}: "
                                "lower the learning rate (--lr)")
            losses.append(last)
            bar.update(stop - start)
            bar.set_postfix(loss=f"{last[-1]:.4f}")
    return unravel(flat), np.concatenate(losses)


def fit_module(module: nnx.Module, x: np.ndarray, targets: np.ndarray,
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array], *, steps: int, batch_size: int,
               lr: float, seed: int = 0, wd: float = 1e-4, clip: float | None = None, progress: bool = False,
               desc: str = "head") -> tuple[nnx.Module, np.ndarray]:
    """Train `module`'s params on loss_fn(module(x[batch]), targets[batch]) with `fit_head`, batch s
    being batch_size distinct examples (numpy, seeded by (seed, 2)); returns the trained module and
    the loss of every step. Used for the video heads and the dense decoders."""
    if steps < 1 or batch_size < 1:
        raise TaskError(f"--steps {steps} and --batch-size {batch_size} must be positive")
    batch_size = min(batch_size, len(x))
    graphdef, params = nnx.split(module, nnx.Param)
    rng = np.random.default_rng([seed, 2])
    idx = np.stack([np.sort(rng.choice(len(x), batch_size, replace=False)) for _ in range(steps)])

    def batches(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        # gathered on the host a chunk at a time: cached features can outgrow an accelerator
        return x[idx[start:stop]], targets[idx[start:stop]]

    def loss_of(p: Any, _: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, p)(batch[0]), batch[1])

    params, losses = fit_head(loss_of, params, inputs=batches, steps=steps, lr=lr, wd=wd, clip=clip,
                              progress=progress, desc=desc)
    return nnx.merge(graphdef, params), losses


# ----------------------------------------------------------------------------- results
def results_path(task: str, *, checkpoint: str | Path, out: str | Path | None = None,
                 workdir: str | Path | None = None) -> Path:
    """--out, else WORKDIR/<task>.json, else <task>.json in the checkpoint's directory."""
    if out:
        return Path(out)
    if workdir:
        return Path(workdir) / f"{task}.json"
    ckpt = Path(checkpoint)
    return (ckpt if ckpt.is_dir() else ckpt.parent) / f"{task}.json"


def save_head(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """A trained head's tensors (a nested dict; names joined by '/') as float32 safetensors with
    string metadata, written atomically."""
    from safetensors.numpy import save_file

    flat = {k: np.array(v, np.float32) for k, v in weights.flatten(tensors).items()}  # copies keep 0-d
    weights.atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    return path


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def finish(results: dict[str, Any], path: Path, summary: str) -> int:
    """Write the results to `path`, print them and then the one-paragraph summary; exit code 0."""
    write_json(path, results)
    print(json.dumps(results, indent=2))
    print(f"{summary} -> {path}")
    return 0
