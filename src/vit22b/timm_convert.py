"""Weights to and from timm's ViT-22B-style model (PyTorch), without needing torch.

The entry points also dispatch timm's standard ViT family (sequential blocks) to timm_vit.py.

timm's side: `VisionTransformer(block_fn=partial(ParallelScalingBlock, fuse_out_proj=True),
qkv_bias=False, qk_norm=True, class_token=False, no_embed_class=True, global_pool='map', ...)`.

Layout facts (tests/data/timm/README.md):
  blocks.i.in_proj.weight  [M + 3D, D]  rows: mlp | q | k | v (q/k/v head-major), no bias;
                                        the MLP-in bias is blocks.i.mlp_bias [M]
  blocks.i.out_proj.weight [D, D + M]   columns: attn (head-major) | mlp; one bias [D]
  q_norm/k_norm            [head_dim]   shared by the heads
  attn_pool: latent [1,1,D], q, kv (k then v), proj, norm, mlp.fc1, mlp.fc2
Ours: encoder.py's per-head fused layout. MLP unit j of timm goes to head j // (M/H).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vit22b.config import ConfigError, ModelConfig

Flat = dict[str, np.ndarray]


def config_from_timm(state: Flat, *, num_heads: int | None = None, head_dim: int | None = None,
                     norm: str = "layer", qk_norm_type: str | None = None,
                     gelu_approximate: bool = False, **overrides: Any) -> ModelConfig:
    """Infer a ModelConfig from timm tensor names and shapes; heads/norm/GELU can't be seen in shapes.

    timm's standard ViT (`blocks.i.attn.qkv`) goes to timm_vit.detect_config; this handles the
    parallel-block layout. timm's `norm_layer=partial(LayerNorm, bias=False)` is norm='layer',
    timm's RmsNorm is 'rms'; timm's act_layer 'gelu' is exact (gelu_approximate=False), 'gelu_tanh'
    approximate. Without num_heads: from the q_norm size, else width / head_dim (default 64).
    """
    if "blocks.0.attn.qkv.weight" in state:
        from vit22b.timm_vit import detect_config  # imports this module

        return detect_config(state, num_heads=num_heads, head_dim=head_dim, norm=norm,
                             qk_norm_type=qk_norm_type, gelu_approximate=gelu_approximate, **overrides)
    required = ["patch_embed.proj.weight", "pos_embed", "blocks.0.in_proj.weight", "attn_pool.latent"]
    for key in required:
        if key not in state:
            raise ConfigError(
                f"timm weights lack {key!r}: neither timm's standard ViT (blocks.i.attn.qkv) nor its "
                "parallel-block ViT (fuse_out_proj=True, no class token, global_pool='map')")
    D, C, p, _ = state["patch_embed.proj.weight"].shape
    seen_hd = state["blocks.0.q_norm.weight"].shape[0] if "blocks.0.q_norm.weight" in state else None
    if seen_hd and num_heads is not None and seen_hd * num_heads != D:
        head_dim = state["blocks.0.q_norm.weight"].shape[0]
        raise ConfigError(f"num_heads={num_heads} contradicts the weights: q_norm has head_dim "
                          f"{head_dim} and the width is {D}, so num_heads must be {D // head_dim}")
    if num_heads is None:
        if "blocks.0.q_norm.weight" in state:
            num_heads = D // state["blocks.0.q_norm.weight"].shape[0]
        elif D % (head_dim or 64) == 0:
            num_heads = D // (head_dim or 64)
        else:
            raise ConfigError(f"width {D} is not a multiple of head_dim {head_dim or 64}: pass --num-heads")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_dim = state["blocks.0.in_proj.weight"].shape[0] - 3 * D
    grid = int(round(np.sqrt(state["pos_embed"].shape[1])))
    fields: dict[str, Any] = dict(
        width=D, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=p,
        image_size=grid * p, in_channels=C,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        block="parallel", head="map", posemb="learn", norm=norm, qk_norm_type=qk_norm_type,
        gelu_approximate=gelu_approximate, qk_norm="blocks.0.q_norm.weight" in state,
        qkv_bias=False, mlp_bias="blocks.0.mlp_bias" in state,
        out_bias="blocks.0.out_proj.bias" in state, norm_bias="norm.bias" in state,
        patch_bias="patch_embed.proj.bias" in state, map_bias="attn_pool.q.bias" in state)
    fields.update(overrides)
    return ModelConfig(**fields)


def refuse_conv_stem(cfg: ModelConfig, target: str) -> None:
    if cfg.conv_stem_channels:
        raise ConfigError(f"{target} has no conv stem, but this model has one (conv_stem_channels="
                          f"{cfg.conv_stem_channels}): its weights stay in vit22b's own safetensors")


def _check_supported(cfg: ModelConfig) -> None:
    refuse_conv_stem(cfg, "timm's parallel-block ViT")
    extras = cfg.num_prefix_tokens or cfg.pre_norm or cfg.fc_norm
    if cfg.head != "map" or cfg.posemb != "learn" or cfg.qkv_bias or extras:
        raise ConfigError(
            "timm's parallel-block ViT has head='map', posemb='learn', no QKV bias, no class token, "
            f"registers, pre_norm or fc_norm; this model has head={cfg.head!r}, posemb={cfg.posemb!r}, "
            f"qkv_bias={cfg.qkv_bias}, prefix tokens {cfg.num_prefix_tokens}, pre_norm={cfg.pre_norm}, "
            f"fc_norm={cfg.fc_norm}")
    if cfg.mlp_bias != cfg.out_bias:
        raise ConfigError("timm's fused out_proj has one bias: mlp_bias and out_bias must agree")


def _norm(prefix: str, ours: str, cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [(f"{prefix}.weight", f"{ours}_scale")]
    if cfg.norm_bias:
        pairs.append((f"{prefix}.bias", f"{ours}_bias"))
    return pairs


def _map_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("attn_pool.latent", "map_head/probe")] + _norm("attn_pool.norm", "map_head/norm", cfg)
    if cfg.mlp_bias:
        pairs += [("attn_pool.mlp.fc1.bias", "map_head/mlp_in_bias"),
                  ("attn_pool.mlp.fc2.bias", "map_head/mlp_out_bias")]
    if cfg.map_bias:
        pairs.append(("attn_pool.proj.bias", "map_head/out_bias"))
    return pairs


def map_head_to_flat(f: TrackedState, cfg: ModelConfig) -> Flat:
    """timm's AttentionPoolLatent (`attn_pool.*`) -> our map_head/*; shared by both block kinds."""
    D, H, hd = cfg.width, cfg.num_heads, cfg.head_dim
    out: Flat = {ours: f[theirs] for theirs, ours in _map_pairs(cfg)}
    out["map_head/query_kernel"] = f["attn_pool.q.weight"].T.reshape(D, H, hd)
    out["map_head/kv_kernel"] = f["attn_pool.kv.weight"].T.reshape(D, 2, H, hd)
    out["map_head/out_kernel"] = f["attn_pool.proj.weight"].T.reshape(H, hd, D)
    if cfg.map_bias:
        out["map_head/query_bias"] = f["attn_pool.q.bias"].reshape(H, hd)
        out["map_head/kv_bias"] = f["attn_pool.kv.bias"].reshape(2, H, hd)
    out["map_head/mlp_in_kernel"] = f["attn_pool.mlp.fc1.weight"].T
    out["map_head/mlp_out_kernel"] = f["attn_pool.mlp.fc2.weight"].T
    return out


def map_head_from_flat(f: Flat, cfg: ModelConfig) -> Flat:
    """The inverse of map_head_to_flat."""
    D = cfg.width
    out: Flat = {theirs: f[ours] for theirs, ours in _map_pairs(cfg)}
    out["attn_pool.q.weight"] = f["map_head/query_kernel"].reshape(D, D).T
    out["attn_pool.kv.weight"] = f["map_head/kv_kernel"].reshape(D, 2 * D).T
    out["attn_pool.proj.weight"] = f["map_head/out_kernel"].reshape(D, D).T
    if cfg.map_bias:
        out["attn_pool.q.bias"] = f["map_head/query_bias"].reshape(D)
        out["attn_pool.kv.bias"] = f["map_head/kv_bias"].reshape(2 * D)
    out["attn_pool.mlp.fc1.weight"] = f["map_head/mlp_in_kernel"].T
    out["attn_pool.mlp.fc2.weight"] = f["map_head/mlp_out_kernel"].T
    return out


def check_all_used(state: Flat, f: TrackedState) -> None:
    unused = sorted(set(state) - f.used)
    if unused:
        raise ConfigError(f"timm tensor {unused[0]!r} has no counterpart in this config ({len(unused)} "
                          "unused, e.g. a class token, biases or norms the flags switched off): "
                          "converting would silently change the function; pass matching flags")


def _simple_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(timm key, our flat name) for tensors that only need a transpose or nothing."""
    pairs = [("pos_embed", "pos_embedding")] + _norm("norm", "encoder_norm", cfg)
    if cfg.patch_bias:
        pairs.append(("patch_embed.proj.bias", "patch_bias"))
    if cfg.num_classes:
        pairs.append(("head.bias", "head_bias"))
    return pairs


def timm_to_flat(state: Flat, cfg: ModelConfig) -> Flat:
    """timm state dict (numpy, torch layouts) -> our flat '/'-named params."""
    if cfg.block == "sequential":
        from vit22b.timm_vit import vit_to_flat

        return vit_to_flat(state, cfg)
    _check_supported(cfg)
    D, H, hd, M, L = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.depth
    Mh = cfg.mlp_per_head
    f = TrackedState(state)
    out: Flat = {ours: f[theirs] for theirs, ours in _simple_pairs(cfg)}
    out["patch_kernel"] = f["patch_embed.proj.weight"].transpose(2, 3, 1, 0)  # [D,C,p,p]->[p,p,C,D]

    def stack(fn: Any) -> np.ndarray:
        return np.stack([fn(i) for i in range(L)])

    def in_kernel(i: int) -> np.ndarray:
        w = f[f"blocks.{i}.in_proj.weight"].T  # [D, M + 3D]
        mlp, q, k, v = np.split(w, [M, M + D, M + 2 * D], axis=1)
        per_head = [a.reshape(D, H, -1) for a in (q, k, v, mlp)]  # mlp: [D, H, M/H]
        return np.concatenate(per_head, axis=-1)

    def out_kernel(i: int) -> np.ndarray:
        w = f[f"blocks.{i}.out_proj.weight"].T  # [D + M, D]
        attn, mlp = w[:D].reshape(H, hd, D), w[D:].reshape(H, Mh, D)
        return np.concatenate([attn, mlp], axis=1)

    out["encoder/in_kernel"] = stack(in_kernel)
    out["encoder/out_kernel"] = stack(out_kernel)
    out["encoder/norm_scale"] = stack(lambda i: f[f"blocks.{i}.in_norm.weight"])
    if cfg.norm_bias:
        out["encoder/norm_bias"] = stack(lambda i: f[f"blocks.{i}.in_norm.bias"])
    if cfg.qk_norm:
        for n in ("q", "k"):
            out[f"encoder/{n}_norm_scale"] = stack(lambda i, n=n: f[f"blocks.{i}.{n}_norm.weight"])
            if cfg.norm_bias:
                out[f"encoder/{n}_norm_bias"] = stack(lambda i, n=n: f[f"blocks.{i}.{n}_norm.bias"])
    if cfg.mlp_bias:
        out["encoder/mlp_in_bias"] = stack(lambda i: f[f"blocks.{i}.mlp_bias"].reshape(H, Mh))
        out["encoder/out_bias"] = stack(lambda i: f[f"blocks.{i}.out_proj.bias"])

    out.update(map_head_to_flat(f, cfg))
    if cfg.num_classes:
        out["head_kernel"] = f["head.weight"].T
    check_all_used(state, f)
    return out


class TrackedState:
    """The timm state dict as float32, remembering which keys the conversion read."""

    def __init__(self, state: Flat):
        self.state, self.used = state, set()

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ConfigError(f"timm weights lack {key!r}, which this config needs: the file is "
                              "for another architecture or was cut short")
        self.used.add(key)
        return np.asarray(self.state[key], np.float32)


def flat_to_timm(flat: Flat, cfg: ModelConfig) -> Flat:
    """Our flat params -> timm state dict (numpy, torch layouts); the inverse of timm_to_flat."""
    if cfg.block == "sequential":
        from vit22b.timm_vit import flat_to_vit

        return flat_to_vit(flat, cfg)
    _check_supported(cfg)
    D, _H, hd, M, L = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.depth
    f = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    out: Flat = {theirs: f[ours] for theirs, ours in _simple_pairs(cfg)}
    out["patch_embed.proj.weight"] = f["patch_kernel"].transpose(3, 2, 0, 1)
    for i in range(L):
        q, k, v, mlp = np.split(f["encoder/in_kernel"][i], [hd, 2 * hd, 3 * hd], axis=-1)
        cols = [a.reshape(D, -1) for a in (mlp, q, k, v)]
        out[f"blocks.{i}.in_proj.weight"] = np.concatenate(cols, axis=1).T
        w_out = f["encoder/out_kernel"][i]  # [H, hd + M/H, D]
        rows = [w_out[:, :hd].reshape(D, D), w_out[:, hd:].reshape(M, D)]
        out[f"blocks.{i}.out_proj.weight"] = np.concatenate(rows, axis=0).T
        out[f"blocks.{i}.in_norm.weight"] = f["encoder/norm_scale"][i]
        if cfg.norm_bias:
            out[f"blocks.{i}.in_norm.bias"] = f["encoder/norm_bias"][i]
        if cfg.qk_norm:
            for n in ("q", "k"):
                out[f"blocks.{i}.{n}_norm.weight"] = f[f"encoder/{n}_norm_scale"][i]
                if cfg.norm_bias:
                    out[f"blocks.{i}.{n}_norm.bias"] = f[f"encoder/{n}_norm_bias"][i]
        if cfg.mlp_bias:
            out[f"blocks.{i}.mlp_bias"] = f["encoder/mlp_in_bias"][i].reshape(M)
            out[f"blocks.{i}.out_proj.bias"] = f["encoder/out_bias"][i]
    out.update(map_head_from_flat(f, cfg))
    if cfg.num_classes:
        out["head.weight"] = f["head_kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
