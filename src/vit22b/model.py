"""ViT-22B: patch embedding -> position embedding -> encoder -> final norm -> pooling -> head.

    model = ViT(preset("B/16", num_classes=10), rngs=nnx.Rngs(0))
    logits, out = model(images)            # images: [B, H, W, C] float32
    out["pre_logits"], out["encoded"], out["stem"], ...

The forward pass returns the logits and a dict of named intermediates, so probes, few-shot,
dense heads and distillation read features by name and never edit the model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from vit22b.config import ModelConfig
from vit22b.encoder import Encoder
from vit22b.heads import MAPHead
from vit22b.layers import matmul, normalize, param, small_normal, xavier_uniform
from vit22b.posemb import sincos2d

Params = dict[str, Any]


class ViT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, p, C = cfg.width, cfg.patch_size, cfg.patch_in_channels
        key = rngs.params
        if cfg.conv_stem_channels:  # [3, 3, C_image, C] like flax's Conv; small, so replicated
            S, C_img = cfg.conv_stem_channels, cfg.in_channels
            self.stem_conv_kernel = param(xavier_uniform(key(), (3, 3, C_img, S), 9 * C_img, 9 * S),
                                          None, None, None, None)
            self.stem_conv_bias = param(jnp.zeros((S,)), None)
        # Stored like flax's Conv kernel [p, p, C, D]; applied as a matmul over flattened patches.
        self.patch_kernel = param(xavier_uniform(key(), (p, p, C, D), p * p * C, D),
                                  None, None, None, "embed")
        if cfg.patch_bias:
            self.patch_bias = param(jnp.zeros((D,)), "embed")
        if cfg.posemb == "learn":
            std = D**-0.5  # big_vision
            self.pos_embedding = param(std * jax.random.normal(key(), (1, cfg.num_patches, D)),
                                       None, "tokens", "embed")
        if cfg.has_class_token:
            self.cls_token = param(jnp.zeros((1, 1, D)), None, None, "embed")
        if cfg.num_registers:
            self.reg_tokens = param(small_normal(key(), (1, cfg.num_registers, D)),
                                    None, None, "embed")
        if cfg.class_posemb:
            self.prefix_pos_embedding = param(
                D**-0.5 * jax.random.normal(key(), (1, cfg.num_prefix_tokens, D)), None, None, "embed")
        if cfg.pre_norm:
            self.pre_norm_scale = param(jnp.ones((D,)), "embed")
            if cfg.norm_bias:
                self.pre_norm_bias = param(jnp.zeros((D,)), "embed")
        self.encoder = Encoder(cfg, rngs=rngs)
        final = "fc_norm" if cfg.fc_norm else "encoder_norm"  # on pooled features / on tokens
        setattr(self, f"{final}_scale", param(jnp.ones((D,)), "embed"))
        if cfg.norm_bias:
            setattr(self, f"{final}_bias", param(jnp.zeros((D,)), "embed"))
        if cfg.head == "map":
            self.map_head = MAPHead(cfg, rngs=rngs)
        if cfg.num_classes:
            # Zero-initialised, as big_vision: a fresh head starts from uniform predictions, which
            # is also why released checkpoints' heads are all zeros before fine-tuning.
            self.head_kernel = param(jnp.zeros((D, cfg.num_classes)), "embed", "classes")
            self.head_bias = param(jnp.full((cfg.num_classes,), cfg.head_bias_init, jnp.float32), "classes")

    def posemb(self) -> jax.Array:
        if self.cfg.posemb == "learn":
            return self.pos_embedding[...]
        return sincos2d(self.cfg.grid_size, self.cfg.width)

    def check_input(self, images: jax.Array) -> None:
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"model expects images of shape [batch, {want[0]}, {want[1]}, {want[2]}] (NHWC), got "
                f"{tuple(images.shape)}: resize the images, or build the model with "
                f"image_size={images.shape[1] if images.ndim == 4 else '?'} (learned position "
                "embeddings are resampled when weights are loaded at another resolution).")

    def __call__(self, images: jax.Array, *, return_layers: tuple[int, ...] = (),
                 attn_stats: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """images [B, H, W, C] -> (logits, intermediates).

        intermediates: stem [B,N,D] (patch tokens), with_posemb [B,N,D], block_i [B,N,D] for i in
        `return_layers`, encoded [B,N,D] (after the final norm), pre_logits [B,D] (pooled),
        logits; with `attn_stats`, attn_logit_max [depth] (the largest attention logit per layer).
        Token intermediates hold the N patch tokens only (a grid for dense heads); with a class
        token or registers, `prefix` holds those P tokens of `encoded` [B,P,D].
        """
        cfg = self.cfg
        self.check_input(images)
        dt = jnp.dtype(cfg.dtype_mm)
        p = cfg.patch_size
        if cfg.conv_stem_channels:
            images = jax.lax.conv_general_dilated(
                images.astype(dt), self.stem_conv_kernel[...].astype(dt), (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
            images = jax.nn.gelu(images + self.stem_conv_bias[...], approximate=cfg.gelu_approximate)
        patches = rearrange(images, "b (h p) (w q) c -> b (h w) p q c", p=p, q=p)
        x = matmul("bnpqc,pqcd->bnd", patches, self.patch_kernel[...], dt)
        if cfg.patch_bias:
            x = x + self.patch_bias[...]
        out: dict[str, jax.Array] = {"stem": x}
        x = x + self.posemb()
        out["with_posemb"] = x
        P = cfg.num_prefix_tokens
        if P:  # class token, then registers, before the patches (timm's order)
            prefix = [self.cls_token[...]] if cfg.has_class_token else []
            prefix += [self.reg_tokens[...]] if cfg.num_registers else []
            prefix = jnp.concatenate(prefix, axis=1)
            if cfg.class_posemb:  # else the posemb was added before prepending (big_vision)
                prefix = prefix + self.prefix_pos_embedding[...]
            x = jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0], P, cfg.width)), x], axis=1)
        if cfg.pre_norm:
            bias = self.pre_norm_bias[...] if cfg.norm_bias else None
            x = normalize(x, self.pre_norm_scale[...], bias, cfg.norm, cfg.norm_eps)

        x, encoder_out = self.encoder(x, return_layers=return_layers, attn_stats=attn_stats)
        out.update({k: v[:, P:] if k.startswith("block_") else v for k, v in encoder_out.items()})
        if not cfg.fc_norm:
            bias = self.encoder_norm_bias[...] if cfg.norm_bias else None
            x = normalize(x, self.encoder_norm_scale[...], bias, cfg.norm, cfg.norm_eps)
        out["encoded"] = x[:, P:]
        if P:
            out["prefix"] = x[:, :P]

        if cfg.head == "map":  # over all tokens, prefix included (timm)
            x = self.map_head(x)
        elif cfg.head == "gap":  # over the patch tokens (timm)
            x = jnp.mean(x[:, P:], axis=1)
        elif cfg.head == "token":
            x = x[:, 0]
        else:
            x = x[:, P:]
        if cfg.fc_norm:
            bias = self.fc_norm_bias[...] if cfg.norm_bias else None
            x = normalize(x, self.fc_norm_scale[...], bias, cfg.norm, cfg.norm_eps)
        out["pre_logits"] = x  # "none": per-token features [B, N, D]

        if cfg.num_classes:
            x = matmul("...d,dc->...c", x, self.head_kernel[...], dt) + self.head_bias[...]
        out["logits"] = x
        return x, out


def init_model(cfg: ModelConfig, seed: int = 0) -> ViT:
    return ViT(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> ViT:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes of any size (22B too), no memory."""
    return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(params=0)))


def split_params(model: ViT) -> tuple[nnx.GraphDef, Params]:
    """(graphdef, nested dict of arrays): the pure-pytree form that jit, optax and orbax see."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef: nnx.GraphDef, params: Params, images: jax.Array,
          **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Functional forward pass on a params pytree (for use inside jit/grad)."""
    return nnx.merge(graphdef, params)(images, **kwargs)


def logical_axes(model: ViT) -> Params:
    """Nested dict (same structure as the params) of each parameter's logical axis names."""
    _, state = nnx.split(model, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.to_pure_dict(axes)


def count_params(params: Params) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(params))
