"""A plain hand-written JAX ViT of the same function as vit22b's model: the ceiling check of issue 14.

vit22b's execution carries what the paper's scale needs (stacked layer parameters for `lax.scan`,
remat, a per-head fused kernel layout that shards on the model axis, sharding constraints, nnx).
This file is the same function written as straight `jnp` code over a flat dict of arrays, so that
`compare_timm.py` can time it beside vit22b and timm and show which execution choice costs what.
It is a benchmark contender only, not a second model: its parameters are converted from vit22b's
(`plain_params`), and `compare_timm.py` checks that both give the same logits before timing.

Scope: the paper's defaults in float32 (parallel block, QK RMS norm, no QKV bias, MLP/out/patch/MAP
biases, learned position embedding, MAP head, tanh GELU); anything else is refused. The factors,
each one switch away from the plain model (contiguous layout, unrolled, no remat, split out):

  layout  "contiguous": timm's kernels, q | k | v | mlp as column blocks of one [D, 3D + M] matrix
          and attn | mlp as row blocks of one [D + M, D];
          "heads": vit22b's stored layout, [D, H, 3hd + M/H] with each head's q, k, v and MLP
          share side by side, and [H, hd + M/H, D]
  loop    "unrolled": a Python loop over the layers; "scan": `lax.scan` over stacked parameters
  remat   "none" or a `jax.checkpoint_policies` name, applied per layer
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit22b.config import ModelConfig

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class Plain:
    layout: str = "contiguous"  # "contiguous" | "heads"
    loop: str = "unrolled"  # "unrolled" | "scan"
    remat: str = "none"  # "none" | a jax.checkpoint_policies name


def check_scope(cfg: ModelConfig) -> None:
    wanted = dict(block="parallel", qk_norm=True, norm="rms", norm_bias=False, qkv_bias=False,
                  mlp_bias=True, out_bias=True, patch_bias=True, map_bias=True, head="map",
                  posemb="learn", act="gelu", num_registers=0, class_token=None, pre_norm=False,
                  fc_norm=False, conv_stem_channels=0, dtype_mm="float32")
    wrong = {k: getattr(cfg, k) for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong or cfg.qk_norm_type not in (None, "rms"):
        raise ValueError(f"plain_vit covers the paper's defaults in float32 only; this config has {wrong}")


def plain_params(cfg: ModelConfig, params: Any, plain: Plain) -> Params:
    """vit22b's nested params -> a flat dict; stacked [L, ...] block arrays, in `plain.layout`."""
    check_scope(cfg)
    L, D, hd, M = cfg.depth, cfg.width, cfg.head_dim, cfg.mlp_dim
    enc, head = params["encoder"], params["map_head"]
    w_in, w_out = enc["in_kernel"], enc["out_kernel"]  # [L, D, H, 3hd + M/H], [L, H, hd + M/H, D]
    if plain.layout == "contiguous":
        q, k, v, m = jnp.split(w_in, [hd, 2 * hd, 3 * hd], axis=-1)
        w_in = jnp.concatenate([a.reshape(L, D, -1) for a in (q, k, v, m)], axis=-1)  # [L, D, 3D + M]
        w_out = jnp.concatenate([w_out[:, :, :hd].reshape(L, D, D),  # [L, D + M, D]
                                 w_out[:, :, hd:].reshape(L, M, D)], axis=1)
        mlp_bias = enc["mlp_in_bias"].reshape(L, M)
    elif plain.layout == "heads":
        mlp_bias = enc["mlp_in_bias"]
    else:
        raise ValueError(f"layout {plain.layout!r}: 'contiguous' or 'heads'")
    return {
        "patch_kernel": params["patch_kernel"].reshape(-1, D), "patch_bias": params["patch_bias"],
        "posemb": params["pos_embedding"][0],
        "norm": enc["norm_scale"], "q_norm": enc["q_norm_scale"], "k_norm": enc["k_norm_scale"],
        "w_in": w_in, "mlp_bias": mlp_bias, "w_out": w_out, "out_bias": enc["out_bias"],
        "final_norm": params["encoder_norm_scale"],
        "probe": head["probe"][0, 0], "map_q": head["query_kernel"], "map_q_bias": head["query_bias"],
        "map_kv": head["kv_kernel"], "map_kv_bias": head["kv_bias"], "map_out": head["out_kernel"],
        "map_out_bias": head["out_bias"], "map_norm": head["norm_scale"],
        "map_mlp_in": head["mlp_in_kernel"], "map_mlp_in_bias": head["mlp_in_bias"],
        "map_mlp_out": head["mlp_out_kernel"], "map_mlp_out_bias": head["mlp_out_bias"],
        "head_kernel": params["head_kernel"], "head_bias": params["head_bias"],
    }


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[B, T, H, d] x [B, S, H, d] -> [B, T, H, d], as [B, H]-batched matmuls with the token axes
    innermost (vit22b's CPU default, layers.heads_major_attention, written out again)."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, d]
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, axis=-1), v), 1, 2)


def block(cfg: ModelConfig, plain: Plain, x: jax.Array, p: Params) -> jax.Array:
    """One parallel block, y = x + Attn(N(x)) + MLP(N(x)); x [B, N, D], p one layer's arrays."""
    B, N, D = x.shape
    H, hd, eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
    h = rms_norm(x, p["norm"], eps)
    if plain.layout == "contiguous":
        q, k, v, m = jnp.split(h @ p["w_in"], [D, 2 * D, 3 * D], axis=-1)  # [B, N, D] x3, [B, N, M]
        q, k, v = (a.reshape(B, N, H, hd) for a in (q, k, v))
        m = jax.nn.gelu(m + p["mlp_bias"], approximate=True)
    else:
        fused = jnp.einsum("bnd,dhf->bnhf", h, p["w_in"])  # [B, N, H, 3hd + M/H]
        q, k, v, m = jnp.split(fused, [hd, 2 * hd, 3 * hd], axis=-1)
        m = jax.nn.gelu(m + p["mlp_bias"], approximate=True)  # [B, N, H, M/H]
    attn = attend(rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps), v)  # [B, N, H, hd]
    if plain.layout == "contiguous":
        y = attn.reshape(B, N, D) @ p["w_out"][:D] + m @ p["w_out"][D:]
    else:
        y = (jnp.einsum("bnhf,hfd->bnd", attn, p["w_out"][:, :hd])
             + jnp.einsum("bnhf,hfd->bnd", m, p["w_out"][:, hd:]))
    return x + y + p["out_bias"]


LAYER_KEYS = ("norm", "q_norm", "k_norm", "w_in", "mlp_bias", "w_out", "out_bias")


def forward(cfg: ModelConfig, plain: Plain, params: Params, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> logits [B, classes]."""
    B, p = images.shape[0], cfg.patch_size
    g = cfg.image_size // p
    patches = images.reshape(B, g, p, g, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
    x = patches @ params["patch_kernel"] + params["patch_bias"] + params["posemb"]  # [B, N, D]

    def layer(x: jax.Array, lp: Params) -> tuple[jax.Array, None]:
        return block(cfg, plain, x, lp), None

    if plain.remat != "none":
        layer = jax.checkpoint(layer, policy=getattr(jax.checkpoint_policies, plain.remat))
    stacked = {k: params[k] for k in LAYER_KEYS}
    if plain.loop == "scan":
        x, _ = jax.lax.scan(layer, x, stacked)
    else:
        for i in range(cfg.depth):
            x, _ = layer(x, {k: a[i] for k, a in stacked.items()})
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    # MAP head: the probe attends over the tokens (no residual, no QK norm), then y + MLP(N(y)).
    q = jnp.einsum("d,dhk->hk", params["probe"], params["map_q"]) + params["map_q_bias"]
    kv = jnp.einsum("bnd,dchk->cbnhk", x, params["map_kv"]) + params["map_kv_bias"][:, None, None]
    pooled = attend(jnp.broadcast_to(q, (B, 1, *q.shape)), kv[0], kv[1])  # [B, 1, H, hd]
    y = jnp.einsum("bthk,hkd->bd", pooled, params["map_out"]) + params["map_out_bias"]
    h = rms_norm(y, params["map_norm"], cfg.norm_eps) @ params["map_mlp_in"] + params["map_mlp_in_bias"]
    y = y + jax.nn.gelu(h, approximate=True) @ params["map_mlp_out"] + params["map_mlp_out_bias"]
    return y @ params["head_kernel"] + params["head_bias"]


def train_step(cfg: ModelConfig, plain: Plain, tx: optax.GradientTransformation) -> Callable:
    """The jitted (params, opt_state, images, labels) -> (params, opt_state, loss), state donated."""
    def loss_fn(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
        logits = forward(cfg, plain, params, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params: Params, opt_state: Any, images: jax.Array, labels: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
