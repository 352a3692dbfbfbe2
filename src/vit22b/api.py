"""The small Python API that mirrors the command line.

    from vit22b import preset, init_model, load_model, save_model, import_timm, export_timm
    model = init_model(preset("B/16", num_classes=10))
    logits, feats = model(images)                 # feats["pre_logits"], feats["encoded"], ...
    save_model("my_model", split_params(model)[1], model.cfg)
    model = load_model("my_model")                # or load_model("my_model", image_size=384)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from vit22b.config import ConfigError, ModelConfig
from vit22b.model import ViT, abstract_model, split_params
from vit22b.posemb import ResampleMethod
from vit22b.timm_convert import config_from_timm, flat_to_timm, timm_to_flat
from vit22b.timm_vit import overrides_from_timm_name
from vit22b.weights import (
    WeightsError,
    atomic_write,
    fit_weights,
    flatten,
    read_safetensors,
    read_weights,
    save_model,
)

__all__ = ["load_model", "save_model", "import_timm", "export_timm", "import_weights", "export_weights",
           "model_from_params"]


def model_from_params(cfg: ModelConfig, params: dict[str, Any]) -> ViT:
    graphdef, _ = nnx.split(abstract_model(cfg), nnx.Param)
    return nnx.merge(graphdef, params)


def load_model(location: str | Path, *, resample: ResampleMethod = "bv_linear",
               **overrides: Any) -> ViT:
    """Build the model a checkpoint directory (or .safetensors file) describes and load it.

    `overrides` change the config (e.g. image_size=384 resamples the position embedding in 2-D;
    dtype_mm="float32" for exact numerics). Changing num_classes is `fine-tuning`, not loading.
    """
    flat, cfg = read_weights(location)
    if cfg is None:
        raise WeightsError(f"{location} carries no vit22b config (no config.json beside it and none "
                           "in the file's metadata): build the ModelConfig yourself and use "
                           "weights.fit_weights")
    cfg = cfg.replace(**overrides)
    _, expected = split_params(abstract_model(cfg))
    return model_from_params(cfg, fit_weights(flat, expected, resample=resample))


def import_timm(src: str | Path, out: str | Path, *, num_heads: int | None = None,
                **config_flags: Any) -> ModelConfig:
    """timm .safetensors state dict -> a vit22b model directory; returns the config used.

    `config_flags` are what shapes cannot tell: norm ('layer' for timm's LayerNorm, 'rms' for
    RmsNorm), qk_norm_type, gelu_approximate (timm 'gelu' is exact, 'gelu_tanh' approximate).
    """
    state = _timm_state(src)
    cfg = config_from_timm(state, num_heads=num_heads, **config_flags)
    flat = timm_to_flat(state, cfg)
    _, expected = split_params(abstract_model(cfg))
    save_model(out, fit_weights(flat, expected), cfg)
    return cfg


def export_timm(location: str | Path, dst: str | Path) -> Path:
    """A vit22b model directory -> a timm state dict in .safetensors (load with
    `timm.models.load_checkpoint` or `safetensors.torch.load_file` + `load_state_dict`)."""
    flat, cfg = read_weights(location)
    if cfg is None:
        raise WeightsError(f"{location} has no config.json: cannot tell its architecture")
    _, expected = split_params(abstract_model(cfg))
    params = fit_weights(flat, expected)
    state = flat_to_timm(flatten(params), cfg)
    dst = Path(dst)
    atomic_write(dst, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return dst



def _timm_state(src: str | Path) -> dict[str, Any]:
    state, _ = read_safetensors(src)  # one-line WeightsError for pickles, bombs, NaN/Inf
    if any(k.startswith("param/") for k in state):  # the golden-reference layout
        state = {k[len("param/"):]: v for k, v in state.items() if k.startswith("param/")}
    return state


def import_weights(src: str | Path, out: str | Path, *, timm_model: str | None = None,
                   variant: str | None = None, **flags: Any) -> ModelConfig:
    """A timm .safetensors state dict or a big_vision/AugReg .npz -> a vit22b model directory.

    The architecture comes from the tensors' names and shapes; `timm_model`
    ('vit_base_patch16_224.augreg_in21k') or `variant` ('So400m/14', big_vision's names) settle
    what they cannot show, and `flags` (ModelConfig fields: num_heads, norm_eps, act,
    gelu_approximate, head, ...; head_dim) override both. Returns the config written.
    """
    flags = {k: v for k, v in flags.items() if v is not None}
    if str(src).endswith(".npz"):
        from vit22b.bigvision_convert import config_from_npz, npz_to_timm, read_npz

        if timm_model:
            flags = {**overrides_from_timm_name(timm_model), **flags}
        state, facts = npz_to_timm(read_npz(src))
        cfg = config_from_npz(state, facts, variant=variant, **flags)
    else:
        if variant:
            raise ConfigError("--variant names a big_vision model (.npz); for timm weights use --timm-model")
        state = _timm_state(src)
        if timm_model:
            flags = {**overrides_from_timm_name(timm_model), **flags}
        cfg = config_from_timm(state, **flags)
    flat = timm_to_flat(state, cfg)
    _, expected = split_params(abstract_model(cfg))
    save_model(out, fit_weights(flat, expected), cfg)
    return cfg


def export_weights(location: str | Path, dst: str | Path, *, npz_layout: str | None = None,
                   npz_prefix: str = "", npz_scan: bool = False) -> Path:
    """A vit22b model directory -> timm .safetensors, or (dst ending in .npz) a big_vision/AugReg
    .npz that timm's `_load_weights` reads: layout 'augreg' (class-token posemb row) or
    'big_vision' (default from the config), names under `npz_prefix` (e.g. 'params/img/'),
    blocks stacked with `npz_scan`."""
    if not str(dst).endswith(".npz"):
        return export_timm(location, dst)
    from vit22b.bigvision_convert import timm_to_npz

    flat, cfg = read_weights(location)
    if cfg is None:
        raise WeightsError(f"{location} has no config.json: cannot tell its architecture")
    _, expected = split_params(abstract_model(cfg))
    arrays = timm_to_npz(flat_to_timm(flatten(fit_weights(flat, expected)), cfg), cfg,
                         layout=npz_layout, prefix=npz_prefix, scan=npz_scan)
    dst = Path(dst)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to the temp name
            np.savez(fh, **arrays)

    atomic_write(dst, write)
    return dst
