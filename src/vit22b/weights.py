"""Model weights as safetensors: flat '/'-joined names, shapes checked, never unpickled.

A *model directory* holds `config.json` (the ModelConfig) and `model.safetensors`; the config is
also repeated in the file's metadata so a lone .safetensors file is self-describing.
`vit22b train` writes one at the end of a run, `vit22b import-timm` writes one from timm weights.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from vit22b.config import ModelConfig
from vit22b.posemb import ResampleMethod, resample_posemb

Params = dict[str, Any]
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class WeightsError(ValueError):
    """Weights that don't fit: the message names the first offending tensor and the fix."""


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def atomic_write(path: Path, write: Any) -> None:
    """write(tmp_path) then rename: a crash mid-write never damages an existing file. The result
    has mode 0666 minus the umask, like any other file (tempfile.mkstemp's 0600 would carry over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode  # 0666 minus the umask, read without changing the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that re-creates the file (safetensors does) may not keep it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(directory: str | Path, params: Params, cfg: ModelConfig) -> Path:
    """Write config.json and model.safetensors (float32) into `directory`."""
    directory = Path(directory)
    flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
            for k, v in flatten(params).items()}
    atomic_write(directory / WEIGHTS_FILE,
                 lambda tmp: save_file(flat, tmp, metadata={"vit22b_config": cfg.to_json()}))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(cfg.to_json()))
    return directory / WEIGHTS_FILE


def weights_path(location: str | Path) -> Path:
    location = Path(location)
    path = location / WEIGHTS_FILE if location.is_dir() else location
    if not path.exists():
        raise FileNotFoundError(
            f"no weights at {path}: pass a model directory containing {WEIGHTS_FILE} (written by "
            "`vit22b train` or `vit22b import-timm`) or a .safetensors file")
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of an untrusted .safetensors file, or one-line WeightsError. The library
    checks the header before allocating anything (its length, and that every tensor's shape x
    dtype fits the bytes it claims inside the file), so oversized headers and shape bombs fail
    cheaply; pickles (.pth, .bin, .pt) are never loaded. Non-finite values are refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}: pass an existing .safetensors file")
    try:
        flat = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({e}): weights are read from .safetensors "
            "only (pickled .pth/.bin/.pt files are never loaded); convert a trusted one with "
            "safetensors.torch.save_file") from e
    for name, value in flat.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            bad = int(np.size(value) - np.isfinite(value).sum())
            raise WeightsError(f"{path}: tensor {name!r} holds {bad} NaN/Inf value(s): the weights are "
                               "broken (a diverged run?); use an earlier checkpoint")
    return flat, meta


def read_weights(location: str | Path) -> tuple[dict[str, np.ndarray], ModelConfig | None]:
    """Flat arrays and the config stored beside or inside them (None if there is none)."""
    path = weights_path(location)
    flat, meta = read_safetensors(path)
    cfg_text = meta.get("vit22b_config")
    if cfg_text is None and (path.parent / CONFIG_FILE).exists():
        cfg_text = (path.parent / CONFIG_FILE).read_text()
    return flat, ModelConfig.from_json(cfg_text) if cfg_text else None


def read_config(location: str | Path) -> ModelConfig | None:
    """The config stored beside or inside the weights, reading the file's header only (a 22B
    checkpoint is ~89 GB); None if there is none."""
    path = weights_path(location)
    try:
        with safe_open(str(path), "np") as f:
            cfg_text = (f.metadata() or {}).get("vit22b_config")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e})") from e
    if cfg_text is None and (path.parent / CONFIG_FILE).exists():  # the same order as read_weights
        cfg_text = (path.parent / CONFIG_FILE).read_text()
    return ModelConfig.from_json(cfg_text) if cfg_text else None


def adapt_input_channels(kernel: np.ndarray, channels: int) -> np.ndarray:
    """A patch kernel [p, p, C, D] for `channels` input channels, as timm's `adapt_input_conv`:
    RGB -> 1 sums the kernel over channels (exactly the RGB model on a gray image replicated to
    RGB); 1 -> C repeats it, scaled by 1/C (the gray model on the channel mean of a colour image)."""
    have = kernel.shape[2]
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    if have == 1:
        return np.repeat(kernel, channels, axis=2) / channels
    raise WeightsError(f"cannot adapt a {have}-channel patch kernel to {channels} channels: only 1 <-> C "
                       "is defined (sum over channels, or repeat and scale)")


def fit_weights(flat: dict[str, np.ndarray], expected: Params, *,
                resample: ResampleMethod = "bv_linear", skip: tuple[str, ...] = ()) -> Params:
    """Check `flat` against the expected params tree (arrays or ShapeDtypeStructs) and return a
    params tree. A learned position embedding of another grid is resampled in 2-D; names in
    `skip` (e.g. the classifier when fine-tuning to new classes) keep the expected values."""
    want = flatten(expected)
    missing = [k for k in want if k not in flat and k not in skip]
    extra = [k for k in flat if k not in want]
    if missing or extra:
        first = (missing or extra)[0]
        raise WeightsError(
            f"weights do not match the model: tensor {first!r} is "
            f"{'missing from the file' if missing else 'not in the model'} "
            f"({len(missing)} missing, {len(extra)} unexpected). The checkpoint was made for "
            "another config (block, head, biases, norms): build the model from the checkpoint's "
            "own config.json, or pass the matching flags.")
    out: dict[str, Any] = {}
    for name, target in want.items():
        if name in skip:
            out[name] = target
            continue
        value = np.asarray(flat[name], np.float32)
        if name == "pos_embedding" and value.shape != tuple(target.shape):
            value = resample_posemb(value, int(round(np.sqrt(target.shape[1]))), resample)
        # The first layer that sees pixels (the conv stem's kernel when there is one), when only
        # its channel axis differs: [h, w, C, out] -> [h, w, C', out].
        if (name in ("patch_kernel", "stem_conv_kernel") and value.ndim == len(target.shape) == 4
                and value.shape[2] != target.shape[2]
                and (*value.shape[:2], value.shape[3]) == (*target.shape[:2], target.shape[3])):
            value = adapt_input_channels(value, int(target.shape[2]))
        if value.shape != tuple(target.shape):
            raise WeightsError(
                f"tensor {name!r} has shape {value.shape} in the file but {tuple(target.shape)} "
                "in the model: the checkpoint is for another width/depth/heads/patch/classes; "
                "use its own config (or `skip` the head when changing classes).")
        out[name] = value
    return unflatten(out)

