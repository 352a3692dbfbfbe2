"""The transformer encoder: ViT-22B's parallel block (and the sequential baseline), stacked.

Parameters of all `depth` blocks live in single arrays with a leading `layers` axis, so the same
arrays serve `lax.scan` (compile time flat in depth) and a Python loop (`scan=False`), and a
checkpoint never needs converting between the two.

The fused layout
----------------
The paper fuses the Q, K, V and MLP-in projections into one matmul, and the attention-out and
MLP-out projections into another. Here the fused in-kernel is stored as

    in_kernel:  [embed D, heads H, 3*head_dim + mlp_dim/H]   columns per head: q | k | v | mlp
    out_kernel: [heads H, head_dim + mlp_dim/H, embed D]     rows per head:    attn | mlp

i.e. each head carries its q, k, v columns *and* an equal share of the MLP units. The order of
MLP units is arbitrary (a permutation of hidden units is the same function), and this order makes
"shard the heads axis over the model mesh axis" give each device its heads and 1/k of the MLP,
which is exactly the paper's model-parallel split of both fused matmuls. Without a model axis
the step may regroup the kernels into timm's contiguous q | k | v | mlp order and multiply that
instead (`fused_layout`): the same function and the same stored parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit22b.config import ModelConfig
from vit22b.layers import (
    attention,
    matmul,
    max_attention_logit,
    mlp_act,
    normalize,
    param,
    small_normal,
    xavier_uniform,
)
from vit22b.parallel_linear import fused_in_projection, fused_out_projection
from vit22b.sharding import MODEL, constrain

Params = dict[str, jax.Array]


class Encoder(nnx.Module):
    """`depth` blocks with stacked parameters (leading axis `layers`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, D, H, hd, M = cfg.depth, cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        key = rngs.params

        def norm_params(prefix: str, size: int, leading: tuple[int, ...], axes: tuple) -> None:
            setattr(self, f"{prefix}_scale", param(jnp.ones((*leading, size)), *axes))
            if cfg.norm_bias:
                setattr(self, f"{prefix}_bias", param(jnp.zeros((*leading, size)), *axes))

        if cfg.qk_norm:
            norm_params("q_norm", hd, (L,), ("layers", "head_dim"))
            norm_params("k_norm", hd, (L,), ("layers", "head_dim"))
        if cfg.qkv_bias:
            self.qkv_bias = param(jnp.zeros((L, H, 3 * hd)), "layers", "heads", "qkv")

        if cfg.block == "parallel":
            Mh = cfg.mlp_per_head
            norm_params("norm", D, (L,), ("layers", "embed"))
            qkv_in = [xavier_uniform(key(), (L, D, H, hd), D, D) for _ in range(3)]
            mlp_in = xavier_uniform(key(), (L, D, H, Mh), D, M)
            self.in_kernel = param(jnp.concatenate([*qkv_in, mlp_in], axis=-1),
                                    "layers", "embed", "heads", "fused_in")
            if cfg.mlp_bias:
                self.mlp_in_bias = param(small_normal(key(), (L, H, Mh)), "layers", "heads", "mlp")
            attn_out = xavier_uniform(key(), (L, H, hd, D), D, D)
            mlp_out = xavier_uniform(key(), (L, H, Mh, D), M, D)
            self.out_kernel = param(jnp.concatenate([attn_out, mlp_out], axis=2),
                                     "layers", "heads", "fused_out", "embed")
            if cfg.mlp_bias or cfg.out_bias:  # attn-out and MLP-out outputs are summed: one bias
                self.out_bias = param(jnp.zeros((L, D)), "layers", "embed")
        else:
            norm_params("attn_norm", D, (L,), ("layers", "embed"))
            norm_params("mlp_norm", D, (L,), ("layers", "embed"))
            self.qkv_kernel = param(
                jnp.concatenate([xavier_uniform(key(), (L, D, H, hd), D, D) for _ in range(3)], -1),
                "layers", "embed", "heads", "qkv")
            self.attn_out_kernel = param(xavier_uniform(key(), (L, H, hd, D), D, D),
                                          "layers", "heads", "head_dim", "embed")
            if cfg.out_bias:
                self.attn_out_bias = param(jnp.zeros((L, D)), "layers", "embed")
            self.mlp_in_kernel = param(xavier_uniform(key(), (L, D, M), D, M), "layers", "embed", "mlp")
            self.mlp_out_kernel = param(xavier_uniform(key(), (L, M, D), M, D), "layers", "mlp", "embed")
            if cfg.mlp_bias:
                self.mlp_in_bias = param(small_normal(key(), (L, M)), "layers", "mlp")
                self.mlp_out_bias = param(small_normal(key(), (L, D)), "layers", "embed")
            if cfg.layer_scale:  # timm's LayerScale: init_values 1e-5 (DINOv2); 1 here = identity
                self.attn_scale = param(jnp.ones((L, D)), "layers", "embed")
                self.mlp_scale = param(jnp.ones((L, D)), "layers", "embed")

    def stacked_params(self) -> Params:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}

    def __call__(self, x: jax.Array, *, return_layers: tuple[int, ...] = (),
                 attn_stats: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, N, D] float32 -> ([B, N, D], {'block_i': [B, N, D], 'attn_logit_max': [L]})."""
        cfg = self.cfg
        block = parallel_block if cfg.block == "parallel" else sequential_block

        def body(x: jax.Array, p: Params) -> tuple[jax.Array, dict[str, jax.Array]]:
            # Between blocks each model device holds 1/k of the features (the paper's layout).
            x = constrain(x, ("batch", None, "act_embed"))
            x, stat = block(p, x, cfg, attn_stats)
            x = constrain(x, ("batch", None, "act_embed"))
            ys: dict[str, jax.Array] = {}
            if return_layers:
                ys["x"] = x
            if attn_stats:
                ys["attn_logit_max"] = stat
            return x, ys

        if cfg.remat != "none":  # "auto" unresolved (no trainer to plan for): the frugal policy
            policy = "nothing_saveable" if cfg.remat == "auto" else cfg.remat
            body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, policy),
                                  prevent_cse=not cfg.scan)
        params = self.stacked_params()
        if cfg.scan:
            x, ys = jax.lax.scan(body, x, params)
        else:
            per_layer = []
            for i in range(cfg.depth):
                x, y = body(x, jax.tree.map(lambda a, i=i: a[i], params))
                per_layer.append(y)
            ys = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}

        out: dict[str, jax.Array] = {}
        for i in return_layers:
            if not -cfg.depth <= i < cfg.depth:
                raise ValueError(f"return_layers: block {i} does not exist (depth {cfg.depth})")
            out[f"block_{i % cfg.depth}"] = ys["x"][i]
        if attn_stats:
            out["attn_logit_max"] = ys["attn_logit_max"]
        return x, out


def _model_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 0 if mesh.empty or MODEL not in mesh.axis_names else mesh.shape[MODEL]


def _attend(p: Params, q: jax.Array, k: jax.Array, v: jax.Array, cfg: ModelConfig,
            attn_stats: bool) -> tuple[jax.Array, jax.Array | None]:
    """QK norm (per head, over head_dim, one scale shared by the heads) then attention."""
    if cfg.qkv_bias:
        bq, bk, bv = jnp.split(p["qkv_bias"], 3, axis=-1)
        q, k, v = q + bq, k + bk, v + bv
    if cfg.qk_norm:
        kind, eps = cfg.qk_norm_kind, cfg.norm_eps
        q = normalize(q, p["q_norm_scale"], p.get("q_norm_bias"), kind, eps)
        k = normalize(k, p["k_norm_scale"], p.get("k_norm_bias"), kind, eps)
    dt = jnp.dtype(cfg.dtype_mm)
    stat = max_attention_logit(q, k) if attn_stats else None
    return attention(q.astype(dt), k.astype(dt), v.astype(dt), cfg.attention, cfg.attention_block), stat


def parallel_block(p: Params, x: jax.Array, cfg: ModelConfig,
                   attn_stats: bool = False) -> tuple[jax.Array, Any]:
    """y = x + MLP(N(x)) + Attn(N(x)) with one fused in- and one fused out-projection."""
    h = normalize(x, p["norm_scale"], p.get("norm_bias"), cfg.norm, cfg.norm_eps)
    model_axis = _model_axis_size()
    collective = cfg.collective_matmul and model_axis > 1
    contiguous = not collective and (cfg.fused_layout == "contiguous"
                                     or (cfg.fused_layout == "auto" and model_axis <= 1))
    project = _contiguous_projections if contiguous else _per_head_projections
    y, stat = project(p, h, cfg, attn_stats, collective)
    if "out_bias" in p:
        y = y + p["out_bias"]
    return x + y, stat


def _per_head_projections(p: Params, h: jax.Array, cfg: ModelConfig, attn_stats: bool,
                          collective: bool) -> tuple[jax.Array, Any]:
    """The fused kernels multiplied as stored, per head: on a model axis each device multiplies
    its own heads (and its 1/k of the MLP units) with no communication inside the block."""
    dt, act, hd = jnp.dtype(cfg.dtype_mm), jnp.dtype(cfg.dtype_act), cfg.head_dim
    if collective:  # ring all-gather of h overlapped with the matmul chunks (paper Fig. 3)
        fused = fused_in_projection(h, p["in_kernel"], None, dt)
    else:
        fused = matmul("bnd,dhf->bnhf", h, p["in_kernel"], dt)  # [B, N, H, 3hd + M/H]
    fused = constrain(fused.astype(act), ("batch", None, "act_heads", None))  # each model device: its heads
    q, k, v, m = jnp.split(fused, [hd, 2 * hd, 3 * hd], axis=-1)
    attn, stat = _attend(p, q, k, v, cfg, attn_stats)  # [B, N, H, hd]
    if cfg.mlp_bias:
        m = m + p["mlp_in_bias"].astype(act)
    m = mlp_act(m, cfg.act, cfg.gelu_approximate)  # [B, N, H, M/H]
    if collective or cfg.out_projection == "fused":
        z = jnp.concatenate([attn.astype(dt), m.astype(dt)], axis=-1)  # [B, N, H, hd + M/H]
    if collective:  # partial sums travel the ring while the next block is computed
        y = fused_out_projection(z, p["out_kernel"], None, dt)
    elif cfg.out_projection == "fused":
        y = matmul("bnhf,hfd->bnd", z, p["out_kernel"], dt)
    else:  # the same sum as two matmuls on the kernel's row blocks: no [B, N, H, F] concatenate
        w = p["out_kernel"]  # [H, hd + M/H, D]
        y = matmul("bnhf,hfd->bnd", attn, w[:, :hd], dt) + matmul("bnhf,hfd->bnd", m, w[:, hd:], dt)
    return y, stat


def _contiguous_projections(p: Params, h: jax.Array, cfg: ModelConfig, attn_stats: bool,
                            collective: bool) -> tuple[jax.Array, Any]:
    """The same function with the kernels regrouped q | k | v | mlp (timm's order) inside the
    step: one [D, 3D + M] in-matmul and [D, D] / [M, D] out-matmuls, whose larger contiguous
    operands XLA's CPU backend multiplies faster than the per-head [D, H, F] form. The regrouping
    is a few copies of the kernels per step (their gradients flow back through it)."""
    del collective  # never: the contiguous layout is for meshes without a model axis
    dt, act, hd = jnp.dtype(cfg.dtype_mm), jnp.dtype(cfg.dtype_act), cfg.head_dim
    B, N, D = h.shape
    H, M = cfg.num_heads, cfg.mlp_dim
    w_in = p["in_kernel"]  # [D, H, 3hd + M/H]
    parts = jnp.split(w_in, [hd, 2 * hd, 3 * hd], axis=-1)  # q, k, v [D, H, hd]; mlp [D, H, M/H]
    w_in = jnp.concatenate([w.reshape(D, -1) for w in parts], axis=-1)  # [D, 3D + M]
    fused = matmul("bnd,df->bnf", h, w_in, dt)  # [B, N, 3D + M]
    fused = constrain(fused.astype(act), ("batch", None, None))
    q, k, v, m = jnp.split(fused, [D, 2 * D, 3 * D], axis=-1)
    q, k, v = (t.reshape(B, N, H, hd) for t in (q, k, v))
    attn, stat = _attend(p, q, k, v, cfg, attn_stats)  # [B, N, H, hd]
    if cfg.mlp_bias:
        m = m + p["mlp_in_bias"].reshape(M).astype(act)
    m = mlp_act(m, cfg.act, cfg.gelu_approximate)  # [B, N, M]
    w_out = p["out_kernel"]  # [H, hd + M/H, D]
    w_attn, w_mlp = w_out[:, :hd].reshape(D, D), w_out[:, hd:].reshape(M, D)
    attn = attn.reshape(B, N, D)
    if cfg.out_projection == "fused":
        z = jnp.concatenate([attn.astype(dt), m.astype(dt)], axis=-1)  # [B, N, D + M]
        y = matmul("bnf,fd->bnd", z, jnp.concatenate([w_attn, w_mlp], axis=0), dt)
    else:
        y = matmul("bnf,fd->bnd", attn, w_attn, dt) + matmul("bnf,fd->bnd", m, w_mlp, dt)
    return y, stat


def sequential_block(p: Params, x: jax.Array, cfg: ModelConfig,
                     attn_stats: bool = False) -> tuple[jax.Array, Any]:
    """The standard pre-norm ViT block: x + Attn(N1(x)), then + MLP(N2(.)) (each branch times
    a per-channel scale with `layer_scale`)."""
    dt, act, hd = jnp.dtype(cfg.dtype_mm), jnp.dtype(cfg.dtype_act), cfg.head_dim
    h = normalize(x, p["attn_norm_scale"], p.get("attn_norm_bias"), cfg.norm, cfg.norm_eps)
    qkv = matmul("bnd,dhf->bnhf", h, p["qkv_kernel"], dt).astype(act)
    qkv = constrain(qkv, ("batch", None, "act_heads", None))  # each model device: its heads
    q, k, v = jnp.split(qkv, [hd, 2 * hd], axis=-1)
    attn, stat = _attend(p, q, k, v, cfg, attn_stats)
    y = matmul("bnhf,hfd->bnd", attn, p["attn_out_kernel"], dt)
    if cfg.out_bias:
        y = y + p["attn_out_bias"]
    if cfg.layer_scale:
        y = y * p["attn_scale"]
    x = x + y
    h = normalize(x, p["mlp_norm_scale"], p.get("mlp_norm_bias"), cfg.norm, cfg.norm_eps)
    m = matmul("bnd,dm->bnm", h, p["mlp_in_kernel"], dt).astype(act)
    m = constrain(m, ("batch", None, "act_mlp"))  # each model device: its share of the MLP units
    if cfg.mlp_bias:
        m = m + p["mlp_in_bias"].astype(act)
    y = matmul("bnm,md->bnd", mlp_act(m, cfg.act, cfg.gelu_approximate), p["mlp_out_kernel"], dt)
    if cfg.mlp_bias:
        y = y + p["mlp_out_bias"]
    if cfg.layer_scale:
        y = y * p["mlp_scale"]
    return x + y, stat
