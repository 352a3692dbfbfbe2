"""The paper's optimiser recipe, assembled from optax pieces.

Default (big_vision's ViT-g/G recipe, which the ViT-22B paper follows):
  global-norm clip 1.0 -> Adafactor-style factored second moment (decay 0.8, beta2 capped at 0.999,
  eps 1e-30) -> first-moment EMA (0.9, stored in bfloat16, no debias) -> decoupled weight decay
  (0.03 on kernels, x100 = 3.0 on the head) -> x learning-rate schedule (rsqrt with linear warm-up
  and linear cool-down, peak 1e-3).
Weight decay is added after the adaptive scaling and then multiplied by the schedule, so the decay
per step is lr(t) * wd * param, as in big_vision ("wd = 0.03 * lr").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

Optimizer = Literal["adafactor", "adamw", "sgd"]
Schedule = Literal["rsqrt", "cosine", "constant"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Optimizer = "adafactor"
    learning_rate: float = 1e-3  # peak
    schedule: Schedule = "rsqrt"
    warmup_steps: int = 10_000
    cooldown_steps: int = 30_000  # rsqrt only: linear decay to 0 over the last steps
    timescale: int = 10_000  # rsqrt: lr = peak / sqrt(1 + (t - warmup) / timescale)
    weight_decay: float = 0.03  # decoupled, multiplied by the learning rate
    head_wd_mult: float = 100.0  # the paper's higher head decay (3.0 vs 0.03) for few-shot transfer
    grad_clip_norm: float = 1.0  # 0 disables
    beta1: float = 0.9
    beta2: float = 0.999  # adamw only; adafactor uses the capped 1 - (t+1)^-0.8
    momentum_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.optimizer not in Optimizer.__args__:
            raise ValueError(f"optimizer {self.optimizer!r}: choose one of {Optimizer.__args__}")
        if self.schedule not in Schedule.__args__:
            raise ValueError(f"schedule {self.schedule!r}: choose one of {Schedule.__args__}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):  # NaN fails both
            raise ValueError(f"learning rate must be positive and finite, got {self.learning_rate}")
        numbers = {"weight_decay": self.weight_decay, "head_wd_mult": self.head_wd_mult,
                   "grad_clip_norm": self.grad_clip_norm}
        for name, value in numbers.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        for name in ("warmup_steps", "cooldown_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Peak lr x warm-up x shape x cool-down, a function of the step."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    cooldown = min(cfg.cooldown_steps, total_steps)

    def schedule(step: jax.Array) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        lr = jnp.asarray(cfg.learning_rate, jnp.float32)
        if warmup:
            lr = lr * jnp.minimum(1.0, (t + 1) / warmup)
        if cfg.schedule == "rsqrt":
            lr = lr / jnp.sqrt(1.0 + jnp.maximum(t - warmup, 0.0) / cfg.timescale)
            if cooldown:
                lr = lr * jnp.clip((total_steps - t) / cooldown, 0.0, 1.0)
        elif cfg.schedule == "cosine":
            progress = jnp.clip((t - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr

    return schedule


def _decay_masks(params: Any) -> tuple[Any, Any]:
    """(body kernels, head kernel): weight decay applies to matmul kernels only (big_vision)."""
    def is_kernel(path: tuple, _: Any) -> bool:
        return "kernel" in str(path[-1].key)

    def is_head(path: tuple, _: Any) -> bool:
        return len(path) == 1 and str(path[0].key) == "head_kernel"

    body = jax.tree_util.tree_map_with_path(lambda p, x: is_kernel(p, x) and not is_head(p, x), params)
    head = jax.tree_util.tree_map_with_path(is_head, params)
    return body, head


def _beta2_capped(step: jax.Array, exponent: float) -> jax.Array:
    """big_vision's Adafactor decay: min(0.999, 1 - (t+1)^-0.8)."""
    return jnp.minimum(0.999, 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** (-exponent))


def make_optimizer(cfg: OptimConfig, params: Any, total_steps: int) -> optax.GradientTransformation:
    """The optax chain for `params` (needed for the weight-decay masks)."""
    body_mask, head_mask = _decay_masks(params)
    if cfg.optimizer == "adafactor":
        scale = [optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=32,
                                             epsilon=1e-30, decay_rate_fn=_beta2_capped),
                 optax.ema(cfg.beta1, debias=False, accumulator_dtype=jnp.dtype(cfg.momentum_dtype))]
    elif cfg.optimizer == "adamw":
        scale = [optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2,
                                     mu_dtype=jnp.dtype(cfg.momentum_dtype))]
    else:
        scale = [optax.trace(decay=cfg.beta1, accumulator_dtype=jnp.dtype(cfg.momentum_dtype))]
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    chain += scale
    chain += [optax.add_decayed_weights(cfg.weight_decay, mask=body_mask),
              optax.add_decayed_weights(cfg.weight_decay * cfg.head_wd_mult, mask=head_mask),
              optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps))]
    return optax.chain(*chain)
