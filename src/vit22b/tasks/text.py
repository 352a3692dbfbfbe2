"""A byte-level tokenizer and a small text transformer: the text tower of `vit22b lit`.

Tokenizer (ByT5, Xue et al. 2022): the UTF-8 bytes of the text, byte b -> id b + 3, with
pad = 0, eos = 1, unk = 2 (unused: every string is bytes), so the vocabulary is 259 ids and
nothing needs to be shipped or downloaded. A sequence is the text's bytes, truncated to
max_len - 1 (never inside a multi-byte character), then eos, then pad up to max_len.

Text tower (the CLIP / LiT text encoder, shrunk): token + learned position embedding, `depth`
pre-LN transformer blocks (x += MHA(LN(x)); x += MLP(LN(x)), GELU) whose attention ignores pad
keys, a final LN, pooling by the eos token (CLIP) or the mean over real tokens, then a linear
projection (no bias) to the joint embedding dim. Written as plain jax functions over a nested
params dict, so that `vit22b.weights.flatten` / `unflatten` + safetensors save and load it; video.py's
temporal head is built from the same blocks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vit22b.tasks.common import TaskError

PAD, EOS, UNK, OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + OFFSET
Params = dict[str, Any]


# ----------------------------------------------------------------------------- tokenizer
def _utf8_prefix(data: bytes, n: int) -> bytes:
    """The longest prefix of `data` with at most n bytes that does not split a character."""
    if len(data) <= n:
        return data
    while n > 0 and (data[n] & 0xC0) == 0x80:  # data[n] continues the character at n - 1
        n -= 1
    return data[:n]


def tokenize(texts: str | Sequence[str], max_len: int) -> np.ndarray:
    """Texts -> int32 ids [N, max_len]: bytes + 3, truncated to max_len - 1, eos, pad 0."""
    if max_len < 2:
        raise TaskError(f"max_len={max_len}: need room for at least one byte and eos (>= 2)")
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = np.full((len(texts), max_len), PAD, np.int32)
    for i, text in enumerate(texts):
        data = _utf8_prefix(text.encode("utf-8"), max_len - 1)
        out[i, :len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + OFFSET
        out[i, len(data)] = EOS
    return out


def detokenize(ids: np.ndarray | Sequence[int]) -> str:
    """One id sequence -> text: bytes up to the first eos/pad; other special ids dropped."""
    data = bytearray()
    for i in np.asarray(ids).tolist():
        if i in (PAD, EOS):
            break
        if i >= OFFSET:
            data.append(i - OFFSET)
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- text tower
@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Text tower shape. `embed_dim` is the joint (image-text) embedding dim."""

    max_len: int = 32
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    embed_dim: int = 64
    pool: Literal["eos", "mean"] = "eos"
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("max_len", "width", "depth", "num_heads", "mlp_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise TaskError(f"text tower {name}={getattr(self, name)}: must be positive")
        if self.max_len < 2:
            raise TaskError(f"text max_len={self.max_len}: need >= 2 (one byte + eos)")
        if self.width % self.num_heads:
            raise TaskError(f"text width {self.width} is not divisible by {self.num_heads} heads: "
                            "pick a width that is a multiple of the head count")
        if self.pool not in ("eos", "mean"):
            raise TaskError(f"text pool {self.pool!r}: use 'eos' or 'mean'")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TextConfig:
        return cls(**json.loads(text))


def init_ln(width: int) -> Params:
    return {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)}


def init_block(width: int, mlp_dim: int, kernel: Callable[[int, int], np.ndarray]) -> Params:
    """One `block`'s params: kernel(fan_in, fan_out) for the matrices (qkv fused, [W, 3W]), LN (1, 0),
    biases 0; numpy, so no per-shape RNG kernels get compiled."""
    w, m = width, mlp_dim

    def dense(fan_in: int, fan_out: int) -> Params:
        return {"kernel": kernel(fan_in, fan_out), "bias": np.zeros(fan_out, np.float32)}

    return {"ln1": init_ln(w), "qkv": dense(w, 3 * w), "out": dense(w, w), "ln2": init_ln(w),
            "mlp1": dense(w, m), "mlp2": dense(m, w)}


def init_text_params(cfg: TextConfig, seed: int = 0) -> Params:
    """CLIP-style init: embeddings N(0, 0.02) / N(0, 0.01), kernels N(0, 1/fan_in), LN (1, 0),
    biases 0, the projection N(0, 1/width)."""
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def kernel(fan_in: int, fan_out: int) -> np.ndarray:
        return normal((fan_in, fan_out), fan_in ** -0.5)

    w = cfg.width
    params: Params = {"token_embedding": normal((cfg.vocab_size, w), 0.02),
                      "pos_embedding": normal((cfg.max_len, w), 0.01)}
    for i in range(cfg.depth):
        params[f"block_{i}"] = init_block(w, cfg.mlp_dim, kernel)
    params["final_ln"] = init_ln(w)
    params["proj"] = {"kernel": kernel(w, cfg.embed_dim)}
    return jax.tree.map(jnp.asarray, params)


# Plain functions over nested dicts (leaves: arrays, or the nnx.Params of video's temporal head),
# shared by the text tower and `tasks.video.TransformerHead`.
def dense(x: jax.Array, p: Params) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def layer_norm(x: jax.Array, p: Params, eps: float = 1e-6) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def residual_mlp(x: jax.Array, p: Params) -> jax.Array:
    """x + MLP(LN(x)), GELU, with p's "ln2", "mlp1" and "mlp2"."""
    h = jax.nn.gelu(dense(layer_norm(x, p["ln2"]), p["mlp1"]))
    return x + h @ p["mlp2"]["kernel"] + p["mlp2"]["bias"]  # summed in the tower's original order


def attention(xq: jax.Array, xkv: jax.Array, p: Params, num_heads: int,
              mask: jax.Array | None = None) -> jax.Array:
    """Multi-head softmax(q k^T / sqrt(d_head)) v, q from xq [B, Lq, W], k and v from xkv [B, Lk, W]
    through the fused p["qkv"] kernel [W, 3W] (one matmul when xkv is xq), then p["out"]. Keys where
    mask [B, Lk] is False (pad) get zero weight."""
    b, n, w = xq.shape
    q, k, v = jnp.split(dense(xq, p["qkv"]), 3, axis=-1)
    if xkv is not xq:  # cross-attention (video's MAP pooling: a probe attends over the tokens)
        k, v = jnp.split(dense(xkv, p["qkv"])[..., w:], 2, axis=-1)
    q, k, v = (t.reshape(*t.shape[:2], num_heads, -1) for t in (q, k, v))  # [B, L, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(w // num_heads)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, w)
    return dense(out, p["out"])


def block(x: jax.Array, p: Params, num_heads: int, mask: jax.Array | None = None) -> jax.Array:
    """Pre-LN encoder block (`init_block`'s params): x + MHSA(LN(x)), then + MLP(LN(x))."""
    y = layer_norm(x, p["ln1"])
    x = x + attention(y, y, p, num_heads, mask)
    return residual_mlp(x, p)


def trim(tokens: np.ndarray) -> np.ndarray:
    """Drop the all-pad tail columns (at least the eos column stays): same embeddings, less work."""
    return tokens[:, :max(1, int((tokens != PAD).sum(1).max()))]


def encode_text(params: Params, cfg: TextConfig, tokens: jax.Array) -> jax.Array:
    """ids [B, L <= max_len] (`tokenize`, maybe `trim`med) -> embeddings [B, embed_dim], not normalised.

    Pad keys are masked and pooling ignores pad queries, so trailing pad columns do not change the
    result."""
    length = tokens.shape[-1]  # may be < max_len: all-pad tail columns cut off change nothing
    if length > cfg.max_len:
        raise TaskError(f"tokens have length {length} but the text tower takes at most "
                        f"{cfg.max_len}: tokenize with max_len={cfg.max_len}")
    mask = tokens != PAD  # [B, L]; eos counts as a real token (it is the CLIP pooling slot)
    x = params["token_embedding"][tokens] + params["pos_embedding"][None, :length]  # [B, L, W]
    for i in range(cfg.depth):
        x = block(x, params[f"block_{i}"], cfg.num_heads, mask)
    x = layer_norm(x, params["final_ln"])
    if cfg.pool == "eos":  # the (single) eos position: argmax of a one-hot row
        pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens == EOS, axis=1)]
    else:
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return pooled @ params["proj"]["kernel"]  # [B, E]
