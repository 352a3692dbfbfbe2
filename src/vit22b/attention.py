"""Memory-efficient attention: keys and values in blocks with an online softmax (flash attention's
algorithm, written in JAX), so neither pass materialises the [B, H, N, N] logits.

Forward: for each key block j, s = q k_j^T / sqrt(d); the running row max m, row sum l and output
accumulator are rescaled by exp(m_old - m_new) as in Milakov & Gimelshein (2018) / Dao et al.
(2022). The pass saves only the output and the log-sum-exp per query (lse = m + log l).
Backward (custom VJP): each key block's probabilities are recomputed from lse,
    p = exp(s - lse),  dv_j = p^T do,  dp = do v_j^T,  ds = p * (dp - D),  D = rowsum(do * o),
    dq += ds k_j / sqrt(d),  dk_j = ds^T q / sqrt(d),
so memory is O(N x block) per step in both passes: linear in the number of tokens for a fixed
block, where the plain lowering is quadratic. A sequence that is not a multiple of the block is
padded with keys whose logits are -inf.

`jax.nn.dot_product_attention` stays the default for short sequences (its XLA lowering is faster
when the logits fit in cache) and on GPUs, where it dispatches to cuDNN's fused kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # a finite -inf: exp(_NEG - m) underflows to 0 without NaNs from inf - inf


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
    """[B, S, H, d] -> [S/block, B, block, H, d], padded with zeros to a multiple of `block`."""
    b, s, h, d = x.shape
    pad = -s % block
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.reshape(b, (s + pad) // block, block, h, d).transpose(1, 0, 2, 3, 4), pad


def _key_bias(s: int, block: int) -> jax.Array:
    """[S/block, block]: 0 for real keys, _NEG for padding."""
    n = -(-s // block) * block
    return jnp.where(jnp.arange(n) < s, 0.0, _NEG).reshape(-1, block)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    b, t, h, d = q.shape
    scale = 1.0 / np.sqrt(d)
    kb, _ = _blocks(k, block)
    vb, _ = _blocks(v, block)
    bias = _key_bias(k.shape[1], block)

    def step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        acc, m, l = carry  # [B, T, H, d], [B, H, T], [B, H, T]
        kj, vj, bj = xs
        s = jnp.einsum("bthd,bshd->bhts", q, kj, preferred_element_type=jnp.float32) * scale + bj
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])  # [B, H, T, block]
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bhts,bshd->bthd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
        acc = acc * correction.transpose(0, 2, 1)[..., None] + pv
        return (acc, m_new, l), None

    init = (jnp.zeros((b, t, h, d), jnp.float32), jnp.full((b, h, t), _NEG, jnp.float32),
            jnp.zeros((b, h, t), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, (kb, vb, bias))
    out = acc / l.transpose(0, 2, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(l)  # lse: [B, H, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = 128) -> jax.Array:
    """Softmax attention, q: [B, T, H, d], k/v: [B, S, H, d] -> [B, T, H, d], scaled by 1/sqrt(d),
    equal to `jax.nn.dot_product_attention(q, k, v)` up to float rounding."""
    return _forward(q, k, v, block)[0]


def _fwd(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> tuple[jax.Array, tuple]:
    out, lse = _forward(q, k, v, block)
    return out, (q, k, v, out, lse)


def _bwd(block: int, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = res
    s_len, d = k.shape[1], q.shape[-1]
    scale = 1.0 / np.sqrt(d)
    kb, _ = _blocks(k, block)
    vb, _ = _blocks(v, block)
    bias = _key_bias(s_len, block)
    g32 = g.astype(jnp.float32)
    delta = jnp.einsum("bthd,bthd->bht", g32, out.astype(jnp.float32))  # D = rowsum(do * o)

    def step(dq: jax.Array, xs: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        kj, vj, bj = xs
        s = jnp.einsum("bthd,bshd->bhts", q, kj, preferred_element_type=jnp.float32) * scale + bj
        p = jnp.exp(s - lse[..., None])  # [B, H, T, block]
        dv = jnp.einsum("bhts,bthd->bshd", p, g32)
        dp = jnp.einsum("bthd,bshd->bhts", g32, vj.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhts,bshd->bthd", ds, kj.astype(jnp.float32))
        dk = jnp.einsum("bhts,bthd->bshd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (kb, vb, bias))

    def unblock(x: jax.Array) -> jax.Array:  # [S/block, B, block, H, d] -> [B, S, H, d]
        n, b, blk, h, dd = x.shape
        return x.transpose(1, 0, 2, 3, 4).reshape(b, n * blk, h, dd)[:, :s_len]

    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


blockwise_attention.defvjp(_fwd, _bwd)
