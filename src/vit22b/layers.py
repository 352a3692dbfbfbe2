"""Stateless building blocks shared by the encoder blocks and the heads.

They are plain functions of arrays so that the scanned encoder (whose parameters are stacked
over depth) and the unscanned heads use the very same code.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit22b.config import Norm


def matmul(eq: str, x: jax.Array, w: jax.Array, dtype_mm: jnp.dtype) -> jax.Array:
    """einsum with inputs cast to `dtype_mm` and float32 accumulation and output.

    With bf16 inputs the *backward* matmuls also take bf16 inputs (see `_mixed_einsum`): plain
    autodiff would multiply the f32 output gradient by bf16 operands, which XLA runs as f32 matmuls,
    losing the bf16 speed-up for two thirds of the training FLOPs.
    """
    dtype = jnp.dtype(dtype_mm)
    if dtype == jnp.float32:
        return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
    return _mixed_einsum(eq, dtype, x.dtype, w.dtype, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _mixed_einsum(eq: str, dtype: Any, x_dtype: Any, w_dtype: Any, x: jax.Array, w: jax.Array
                  ) -> jax.Array:
    return jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(eq: str, dtype: Any, x_dtype: Any, w_dtype: Any, x: jax.Array, w: jax.Array
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    xc, wc = x.astype(dtype), w.astype(dtype)  # residuals kept in bf16: half the memory
    return jnp.einsum(eq, xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _mixed_einsum_bwd(eq: str, dtype: Any, x_dtype: Any, w_dtype: Any,
                      res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # "X,W->Y": dX = einsum("Y,W->X", g, W), dW = einsum("X,Y->W", X, g). Valid because every index
    # of X and of W also appears in the other operand or in Y (true of all einsums in this model).
    xc, wc = res
    x_idx, rest = eq.split(",")
    w_idx, y_idx = rest.split("->")
    g = g.astype(dtype)
    dx = jnp.einsum(f"{y_idx},{w_idx}->{x_idx}", g, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{x_idx},{y_idx}->{w_idx}", xc, g, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, kind: Norm,
              eps: float) -> jax.Array:
    """RMSNorm (`kind='rms'`, no centring) or LayerNorm over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    if kind == "layer":
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = y * scale
    if bias is not None:
        y = y + bias
    return y


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    return jax.nn.gelu(x, approximate=approximate)


def mlp_act(x: jax.Array, act: str, approximate: bool) -> jax.Array:
    """The MLP nonlinearity: GELU (exact or tanh form), or OpenAI CLIP's x * sigmoid(1.702 x)."""
    if act == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return gelu(x, approximate)


# "auto" uses the blockwise kernel from this many keys on, on CPUs; below it the [N, N] logits are
# small enough that the plain heads-major form wins (see attention.py and bench/README.md).
BLOCKWISE_FROM_TOKENS = 1024


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla", block: int = 128) -> jax.Array:
    """Softmax attention, q: [B, T, H, d], k/v: [B, S, H, d] -> [B, T, H, d], scaled by 1/sqrt(d).

    impl "xla": `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs, a plain XLA lowering
    elsewhere, which materialises the [B, H, T, S] logits); "heads_major": the same two matmuls
    with q, k, v moved to [B, H, T, d] first; "blockwise": attention.py's online-softmax kernel,
    memory linear in tokens; "auto": on CPU blockwise for long sequences, else heads_major; xla
    on other backends.
    """
    if impl == "auto":
        if jax.default_backend() != "cpu":
            impl = "xla"
        else:
            impl = "blockwise" if k.shape[1] >= BLOCKWISE_FROM_TOKENS else "heads_major"
    if impl == "blockwise":
        from vit22b.attention import blockwise_attention

        return blockwise_attention(q, k, v, block)
    if impl == "heads_major":
        return heads_major_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """dot_product_attention's arithmetic (f32 logits and softmax, probabilities cast to v's dtype)
    as batched matmuls over [B, H] with the token axes innermost. Why: XLA's CPU backend runs
    dot_product_attention's [B, T, H, d] contractions with strided operands and a transposed
    [B, H, d, T] output; with this form S/16's forward runs 23-25% more img/s on a Zen 3 core
    pair at batch 8 and 32 (bench/attention_impl.py)."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, d]
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", probs, v), 1, 2)  # [B, T, H, d]


def max_attention_logit(q: jax.Array, k: jax.Array) -> jax.Array:
    """The largest pre-softmax logit, the quantity that explodes without QK norm (paper Fig. 1)."""
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.max(logits) / np.sqrt(q.shape[-1])


def param(value: jax.Array, *axes: str | None) -> nnx.Param:
    """A parameter annotated with one logical axis name per dimension (see sharding rules)."""
    if value.ndim != len(axes):
        raise ValueError(f"parameter of shape {value.shape} needs {value.ndim} axis names, got {axes}")
    return nnx.Param(value, logical_axes=tuple(axes))


# --- initialisers ------------------------------------------------------------------------------

def xavier_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    """Glorot-uniform with the fans given explicitly: the fused and stacked kernels have extra
    axes (layers, heads) that must not count towards the fans."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def small_normal(key: jax.Array, shape: tuple[int, ...], std: float = 1e-6) -> jax.Array:
    """big_vision's MLP bias init."""
    return std * jax.random.normal(key, shape, jnp.float32)
