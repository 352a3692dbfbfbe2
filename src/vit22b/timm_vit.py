"""timm's standard ViT family (sequential blocks) to and from vit22b, without torch.

Covers `timm.models.vision_transformer.VisionTransformer` with its default `Block`: class-token
ViTs (AugReg, DeiT without the distillation token), GAP with or without `fc_norm`, the MAP head
(SigLIP image towers), `norm_pre` (CLIP image towers), LayerScale and register tokens (DINOv2).

timm keys (torch layouts, Linear weights [out, in]) and ours (encoder.py's sequential block):
  blocks.i.attn.qkv.weight [3D, D], rows q | k | v, each head-major  -> qkv_kernel [D, H, 3hd]
  blocks.i.attn.proj.weight [D, D], input columns head-major         -> attn_out_kernel [H, hd, D]
  blocks.i.mlp.fc1/fc2, norm1/norm2, ls1/ls2.gamma                   -> mlp_*, attn/mlp_norm, *_scale
  pos_embed [1, P + N, D] (prefix rows first) or [1, N, D] (no_embed_class=True)
  cls_token [1, 1, D], reg_token [1, R, D], norm_pre, norm or fc_norm, attn_pool.*, head
What shapes cannot show has defaults and flags (`detect_config`): head count (head_dim 64), norm
eps 1e-6, exact GELU, and whether pooling is by class token or average; a timm model name
(`overrides_from_timm_name`) settles them as timm's own constructor would.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from vit22b.config import ConfigError, ModelConfig
from vit22b.timm_convert import (
    Flat,
    TrackedState,
    check_all_used,
    map_head_from_flat,
    map_head_to_flat,
    refuse_conv_stem,
)

DEFAULT_HEAD_DIM = 64
# timm's size words -> num_heads (vision_transformer.py's model functions)
_TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
               "gigantic": 16, "so400m": 16, "so150m": 16, "betwixt": 10, "mediumd": 8}


def is_standard_vit(state: Flat) -> bool:
    return "blocks.0.attn.qkv.weight" in state


def _square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def overrides_from_timm_name(name: str) -> dict[str, Any]:
    """Config fields timm's constructor sets for a model name, e.g. 'vit_base_patch16_224.augreg_in21k',
    'vit_so400m_patch14_siglip_224', 'vit_base_patch16_clip_quickgelu_224.openai',
    'vit_small_patch14_reg4_dinov2.lvd142m', 'deit_small_patch16_224'; shapes give the rest."""
    arch = name.split(".")[0]
    m = re.match(r"(?:vit|deit|deit3)_([a-z0-9]+)_patch(\d+)(?:_|$)", arch)
    if not m or m.group(1) not in _TIMM_HEADS:
        raise ConfigError(f"--timm-model {name!r}: not a timm standard-ViT name (vit_<size>_patch<p>_..., "
                          f"size one of {', '.join(_TIMM_HEADS)}); give --num-heads etc. instead")
    tags = set(arch.split("_")[2:])
    out: dict[str, Any] = dict(num_heads=_TIMM_HEADS[m.group(1)], norm_eps=1e-6, act="gelu",
                               gelu_approximate=False)
    if "clip" in tags:  # vit_*_clip_*: LayerNorm eps 1e-5; OpenAI's own activation in *_quickgelu_*
        out.update(norm_eps=1e-5, act="quick_gelu" if "quickgelu" in tags else "gelu")
    if "gap" in tags:
        out.update(head="gap")
    if "siglip2" in arch or "siglip" in tags:
        out.update(head="map", gelu_approximate="siglip2" in arch)
    return out


def detect_config(state: Flat, *, num_heads: int | None = None, head_dim: int | None = None,
                  **overrides: Any) -> ModelConfig:
    """A ModelConfig from a timm standard-ViT state dict's names and shapes (+ overrides)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ConfigError(f"timm weights lack {key!r}: not a timm VisionTransformer state dict")
    D, C, p, _ = state["patch_embed.proj.weight"].shape
    if "blocks.0.attn.q_norm.weight" in state:
        seen = state["blocks.0.attn.q_norm.weight"].shape[0]
        if num_heads is not None and num_heads * seen != D:
            raise ConfigError(f"num_heads={num_heads} contradicts the weights: q_norm has head_dim "
                              f"{seen} and the width is {D}, so num_heads must be {D // seen}")
        num_heads = D // seen
    if num_heads is None:
        hd = head_dim or DEFAULT_HEAD_DIM
        if D % hd:
            raise ConfigError(f"width {D} is not a multiple of head_dim {hd}: the head count cannot be "
                              "guessed; pass --num-heads (or --timm-model NAME)")
        num_heads = D // hd
    cls = "cls_token" in state
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(cls) + regs
    rows = state["pos_embed"].shape[1]
    class_posemb = overrides.pop("class_posemb", None)
    if class_posemb is None:  # timm's default (no_embed_class=False) when the row count allows it
        class_posemb = prefix > 0 and _square(rows - prefix)
    grid_tokens = rows - prefix * class_posemb
    if not _square(grid_tokens):
        raise ConfigError(f"pos_embed has {rows} rows, which with {prefix} prefix token(s) is no square "
                          "grid: the file is not a square-grid ViT, or pass --class-posemb/--no-class-posemb")
    if "attn_pool.latent" in state:
        head = "map"
    elif cls and "fc_norm.weight" not in state:
        head = "token"  # timm's default global_pool for a class token; avg pooling looks the same
    else:
        head = "gap"
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    fields: dict[str, Any] = dict(
        width=D, depth=depth, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], num_heads=num_heads,
        patch_size=p, image_size=math.isqrt(grid_tokens) * p, in_channels=C,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        block="sequential", head=head, posemb="learn", norm="layer", norm_eps=1e-6,
        gelu_approximate=False, act="gelu", class_token=cls, num_registers=regs,
        class_posemb=class_posemb, pre_norm="norm_pre.weight" in state,
        fc_norm="fc_norm.weight" in state, layer_scale="blocks.0.ls1.gamma" in state,
        qk_norm="blocks.0.attn.q_norm.weight" in state, qkv_bias="blocks.0.attn.qkv.bias" in state,
        norm_bias="blocks.0.norm1.bias" in state, mlp_bias="blocks.0.mlp.fc1.bias" in state,
        out_bias="blocks.0.attn.proj.bias" in state, patch_bias="patch_embed.proj.bias" in state,
        map_bias="attn_pool.q.bias" in state)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**fields)


def _check(cfg: ModelConfig) -> None:
    refuse_conv_stem(cfg, "timm's standard ViT")
    if cfg.block != "sequential" or cfg.posemb != "learn":
        raise ConfigError("timm's standard ViT has sequential blocks and a learned posemb; this "
                          f"config has block={cfg.block!r}, posemb={cfg.posemb!r}")


def _norms(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(timm prefix, our prefix) of the norms outside the blocks."""
    pairs = [("fc_norm", "fc_norm") if cfg.fc_norm else ("norm", "encoder_norm")]
    return pairs + ([("norm_pre", "pre_norm")] if cfg.pre_norm else [])


def _block_norms(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("norm1", "attn_norm"), ("norm2", "mlp_norm")]
    return pairs + ([("attn.q_norm", "q_norm"), ("attn.k_norm", "k_norm")] if cfg.qk_norm else [])


def vit_to_flat(state: Flat, cfg: ModelConfig) -> Flat:
    """timm standard-ViT state dict (numpy) -> our flat '/'-named params."""
    _check(cfg)
    D, H, hd, P, L = cfg.width, cfg.num_heads, cfg.head_dim, cfg.num_prefix_tokens, cfg.depth
    f = TrackedState(state)
    suffixes = [("weight", "scale")] + ([("bias", "bias")] if cfg.norm_bias else [])
    out: Flat = {"patch_kernel": f["patch_embed.proj.weight"].transpose(2, 3, 1, 0)}
    if cfg.patch_bias:
        out["patch_bias"] = f["patch_embed.proj.bias"]
    pos = f["pos_embed"]
    out["pos_embedding"] = pos[:, P:] if cfg.class_posemb else pos
    if cfg.class_posemb:
        out["prefix_pos_embedding"] = pos[:, :P]
    if cfg.has_class_token:
        out["cls_token"] = f["cls_token"]
    if cfg.num_registers:
        out["reg_tokens"] = f["reg_token"]
    for theirs, ours in _norms(cfg):
        for t, o in suffixes:
            out[f"{ours}_{o}"] = f[f"{theirs}.{t}"]

    def stack(key: str, fn: Any = lambda a: a) -> np.ndarray:
        return np.stack([fn(f[f"blocks.{i}.{key}"]) for i in range(L)])

    def qkv_kernel(w: np.ndarray) -> np.ndarray:  # [3D, D] -> [D, H, 3hd], per head q | k | v
        return np.concatenate([a.T.reshape(D, H, hd) for a in np.split(w, 3)], axis=-1)

    e = "encoder/"
    out[e + "qkv_kernel"] = stack("attn.qkv.weight", qkv_kernel)
    if cfg.qkv_bias:
        out[e + "qkv_bias"] = stack("attn.qkv.bias", lambda b: b.reshape(3, H, hd).transpose(1, 0, 2)
                                    .reshape(H, 3 * hd))
    out[e + "attn_out_kernel"] = stack("attn.proj.weight", lambda w: w.T.reshape(H, hd, D))
    if cfg.out_bias:
        out[e + "attn_out_bias"] = stack("attn.proj.bias")
    out[e + "mlp_in_kernel"] = stack("mlp.fc1.weight", lambda w: w.T)
    out[e + "mlp_out_kernel"] = stack("mlp.fc2.weight", lambda w: w.T)
    if cfg.mlp_bias:
        out[e + "mlp_in_bias"], out[e + "mlp_out_bias"] = stack("mlp.fc1.bias"), stack("mlp.fc2.bias")
    for theirs, ours in _block_norms(cfg):
        for t, o in suffixes:
            out[f"{e}{ours}_{o}"] = stack(f"{theirs}.{t}")
    if cfg.layer_scale:
        out[e + "attn_scale"], out[e + "mlp_scale"] = stack("ls1.gamma"), stack("ls2.gamma")
    if cfg.head == "map":
        out.update(map_head_to_flat(f, cfg))
    if cfg.num_classes:
        out["head_kernel"], out["head_bias"] = f["head.weight"].T, f["head.bias"]
    check_all_used(state, f)
    return out


def flat_to_vit(flat: Flat, cfg: ModelConfig) -> Flat:
    """Our flat params -> timm standard-ViT state dict; the inverse of vit_to_flat."""
    _check(cfg)
    D, hd, L = cfg.width, cfg.head_dim, cfg.depth
    f = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    suffixes = [("weight", "scale")] + ([("bias", "bias")] if cfg.norm_bias else [])
    out: Flat = {"patch_embed.proj.weight": f["patch_kernel"].transpose(3, 2, 0, 1)}
    if cfg.patch_bias:
        out["patch_embed.proj.bias"] = f["patch_bias"]
    pos = f["pos_embedding"]
    out["pos_embed"] = np.concatenate([f["prefix_pos_embedding"], pos], 1) if cfg.class_posemb else pos
    if cfg.has_class_token:
        out["cls_token"] = f["cls_token"]
    if cfg.num_registers:
        out["reg_token"] = f["reg_tokens"]
    for theirs, ours in _norms(cfg):
        for t, o in suffixes:
            out[f"{theirs}.{t}"] = f[f"{ours}_{o}"]
    e = "encoder/"
    for i in range(L):
        b = f"blocks.{i}."
        q, k, v = np.split(f[e + "qkv_kernel"][i], [hd, 2 * hd], axis=-1)
        out[b + "attn.qkv.weight"] = np.concatenate([a.reshape(D, D).T for a in (q, k, v)])
        if cfg.qkv_bias:
            out[b + "attn.qkv.bias"] = f[e + "qkv_bias"][i].reshape(-1, 3, hd).transpose(1, 0, 2).reshape(-1)
        out[b + "attn.proj.weight"] = f[e + "attn_out_kernel"][i].reshape(D, D).T
        if cfg.out_bias:
            out[b + "attn.proj.bias"] = f[e + "attn_out_bias"][i]
        out[b + "mlp.fc1.weight"], out[b + "mlp.fc2.weight"] = (f[e + "mlp_in_kernel"][i].T,
                                                                f[e + "mlp_out_kernel"][i].T)
        if cfg.mlp_bias:
            out[b + "mlp.fc1.bias"] = f[e + "mlp_in_bias"][i]
            out[b + "mlp.fc2.bias"] = f[e + "mlp_out_bias"][i]
        for theirs, ours in _block_norms(cfg):
            for t, o in suffixes:
                out[f"{b}{theirs}.{t}"] = f[f"{e}{ours}_{o}"][i]
        if cfg.layer_scale:
            out[b + "ls1.gamma"], out[b + "ls2.gamma"] = f[e + "attn_scale"][i], f[e + "mlp_scale"][i]
    if cfg.head == "map":
        out.update(map_head_from_flat(f, cfg))
    if cfg.num_classes:
        out["head.weight"], out["head.bias"] = f["head_kernel"].T, f["head_bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
