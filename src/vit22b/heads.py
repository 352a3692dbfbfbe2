"""Pooling heads: multihead attention pooling (MAP), as big_vision's MAPHead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vit22b.config import ModelConfig
from vit22b.layers import attention, matmul, mlp_act, normalize, param, small_normal, xavier_uniform


class MAPHead(nnx.Module):
    """A learned probe token attends over the tokens, then x + MLP(N(x)); returns [B, D].

    There is no residual around the attention and no QK norm in the head (big_vision, timm).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, hd, M = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        key = rngs.params
        self.probe = param(xavier_uniform(key(), (1, 1, D), 1, D), None, None, "embed")
        self.query_kernel = param(xavier_uniform(key(), (D, H, hd), D, D), "embed", "heads", "head_dim")
        self.kv_kernel = param(xavier_uniform(key(), (D, 2, H, hd), D, D),
                                "embed", None, "heads", "head_dim")
        self.out_kernel = param(xavier_uniform(key(), (H, hd, D), D, D), "heads", "head_dim", "embed")
        if cfg.map_bias:
            self.query_bias = param(jnp.zeros((H, hd)), "heads", "head_dim")
            self.kv_bias = param(jnp.zeros((2, H, hd)), None, "heads", "head_dim")
            self.out_bias = param(jnp.zeros((D,)), "embed")
        self.norm_scale = param(jnp.ones((D,)), "embed")
        if cfg.norm_bias:
            self.norm_bias = param(jnp.zeros((D,)), "embed")
        self.mlp_in_kernel = param(xavier_uniform(key(), (D, M), D, M), "embed", "mlp")
        self.mlp_out_kernel = param(xavier_uniform(key(), (M, D), M, D), "mlp", "embed")
        if cfg.mlp_bias:
            self.mlp_in_bias = param(small_normal(key(), (M,)), "mlp")
            self.mlp_out_bias = param(small_normal(key(), (D,)), "embed")

    def _query_key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, N, D] -> q [B, 1, H, hd] (the probe's), kv [2, B, N, H, hd]."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype_mm)
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, cfg.width))
        q = matmul("btd,dhk->bthk", probe, self.query_kernel[...], dt)
        kv = matmul("bnd,dchk->cbnhk", x, self.kv_kernel[...], dt)
        if cfg.map_bias:
            q = q + self.query_bias[...]
            kv = kv + self.kv_bias[...][:, None, None]
        return q, kv

    def attention_weights(self, x: jax.Array) -> jax.Array:
        """x [B, N, D] (the encoded tokens) -> [B, H, N]: how much each head's probe takes from
        each token (softmax weights; what the pooled feature looks at, e.g. for pictures)."""
        q, kv = self._query_key_value(x)
        logits = jnp.einsum("bthk,bnhk->bhtn", q, kv[0]) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, :, 0]

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype_mm)
        q, kv = self._query_key_value(x)
        y = attention(q.astype(dt), kv[0].astype(dt), kv[1].astype(dt))
        y = matmul("bthk,hkd->btd", y, self.out_kernel[...], dt)
        if cfg.map_bias:
            y = y + self.out_bias[...]
        h = normalize(y, self.norm_scale[...], self.norm_bias[...] if cfg.norm_bias else None,
                      cfg.norm, cfg.norm_eps)
        h = matmul("btd,dm->btm", h, self.mlp_in_kernel[...], dt)
        if cfg.mlp_bias:
            h = h + self.mlp_in_bias[...]
        h = matmul("btm,md->btd", mlp_act(h, cfg.act, cfg.gelu_approximate), self.mlp_out_kernel[...], dt)
        if cfg.mlp_bias:
            h = h + self.mlp_out_bias[...]
        return (y + h)[:, 0]
