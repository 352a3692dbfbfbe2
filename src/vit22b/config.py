"""Model configuration and the preset table.

One frozen dataclass describes an architecture; every ViT-22B modification is a field whose
default is the paper's choice, so an ablation is one flag away (`block="sequential"`,
`qk_norm=False`, `norm="layer"`, `head="gap"` ... gives back a plain ViT).

Presets are data: `PRESETS[name] = (width, depth, mlp_dim, heads)`, named as in big_vision
(`"B/16"` = variant B with patch 16). ViT-22B itself is `"22B/14"`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

# (width, depth, mlp_dim, num_heads). big_vision's `decode_variant` table, plus ViT-22B
# (Table 1 of the paper) and `nano`, the CPU toy the digits default trains.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "nano": (64, 4, 256, 4),
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
    "22B": (6144, 48, 24576, 48),
}

Block = Literal["parallel", "sequential"]
Norm = Literal["rms", "layer"]
Head = Literal["map", "gap", "token", "none"]
Posemb = Literal["learn", "sincos2d"]


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the parameters' shapes and the forward pass."""

    width: int = 64
    depth: int = 4
    mlp_dim: int = 256
    num_heads: int = 4
    patch_size: int = 14
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000  # 0: no classifier; logits are then the pooled features
    # --- the paper's modifications (defaults = ViT-22B) -----------------------------------
    block: Block = "parallel"  # y = x + MLP(N(x)) + Attn(N(x)), fused in/out projections
    qk_norm: bool = True  # normalise queries and keys per head over head_dim
    qk_norm_type: Norm | None = None  # None: the same kind as `norm`
    norm: Norm = "rms"  # no centring, as the paper cites Zhang & Sennrich (RMSNorm)
    norm_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = True  # kept: "improved quality and no speed reduction"
    out_bias: bool = True  # attention out-projection; fused with the MLP-out bias in parallel blocks
    patch_bias: bool = True
    map_bias: bool = True  # biases in the MAP head's attention and MLP
    gelu_approximate: bool = True  # flax's nn.gelu default (tanh form), as big_vision used
    head: Head = "map"
    posemb: Posemb = "learn"
    norm_eps: float = 1e-6
    head_bias_init: float = 0.0  # -10 for JFT-style sigmoid training (big_vision)
    # --- numerics and memory ----------------------------------------------------------------
    dtype_mm: str = "bfloat16"  # matmul inputs; accumulation is always float32
    # Storage of the blocks' projection outputs (q, k, v, MLP hidden) between the matmuls and the
    # elementwise passes. "bfloat16" halves that memory traffic (norm and softmax statistics are
    # still computed in float32; the residual stream stays float32); see bench/README.md.
    dtype_act: str = "float32"
    scan: bool = True  # lax.scan over layers: compile time flat in depth
    remat: str = "nothing_saveable"  # a jax.checkpoint_policies name, or "none"
    # The paper's asynchronous parallel linear (parallel_linear.py) for the fused projections
    # when the mesh has a model axis; False: XLA's own all-gather / reduce-scatter.
    collective_matmul: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_per_head(self) -> int:
        """MLP units stored beside each head in the fused kernels (see model.py)."""
        return self.mlp_dim // self.num_heads

    @property
    def qk_norm_kind(self) -> Norm:
        return self.qk_norm_type or self.norm

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size",
                     "in_channels"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.width % self.num_heads == 0,
             f"width {self.width} is not divisible by num_heads {self.num_heads}: "
             f"choose a width that is a multiple of the head count (e.g. "
             f"{self.num_heads * max(1, round(self.width / self.num_heads))}).")
        need(self.image_size % self.patch_size == 0,
             f"image size {self.image_size} is not divisible by patch size {self.patch_size}: "
             f"use an image size that is a multiple of {self.patch_size} (e.g. "
             f"{self.patch_size * max(1, round(self.image_size / self.patch_size))}).")
        if self.block == "parallel":
            # The fused kernels keep each head's q, k, v beside an equal share of the MLP so
            # that sharding heads over devices also shards the MLP (see model.py).
            need(self.mlp_dim % self.num_heads == 0,
                 f"mlp_dim {self.mlp_dim} is not divisible by num_heads {self.num_heads}, which "
                 "the parallel block's fused layout needs: pick mlp_dim a multiple of the heads "
                 "or use block='sequential'.")
        if self.posemb == "sincos2d":
            need(self.width % 4 == 0, f"posemb 'sincos2d' needs width divisible by 4, got {self.width}")
        for name, allowed in (("block", Block), ("norm", Norm), ("head", Head), ("posemb", Posemb)):
            need(getattr(self, name) in allowed.__args__,
                 f"{name}={getattr(self, name)!r} is not one of {allowed.__args__}")
        need(self.qk_norm_type in (None, "rms", "layer"),
             f"qk_norm_type={self.qk_norm_type!r} is not one of None, 'rms', 'layer'")
        need(self.dtype_mm in ("bfloat16", "float32", "float16"),
             f"dtype_mm={self.dtype_mm!r}: use 'bfloat16', 'float16' or 'float32'")
        need(self.dtype_act in ("bfloat16", "float32"),
             f"dtype_act={self.dtype_act!r}: use 'float32' or 'bfloat16'")
        need(math.isfinite(self.norm_eps) and self.norm_eps > 0,
             f"norm_eps={self.norm_eps}: use a small positive number, e.g. 1e-6")
        need(math.isfinite(self.head_bias_init), f"head_bias_init={self.head_bias_init}: use a finite "
             "number, e.g. 0 or -log(classes - 1)")
        if self.remat != "none":  # checked here: otherwise it fails only when the step is traced
            import jax

            need(callable(getattr(jax.checkpoint_policies, self.remat, None)),
                 f"remat={self.remat!r}: use 'none' or a jax.checkpoint_policies name, e.g. "
                 "'nothing_saveable' or 'dots_saveable'")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


def parse_preset(name: str) -> tuple[str, int | None]:
    """'B/16' -> ('B', 16); 'B' -> ('B', None)."""
    variant, _, patch = name.partition("/")
    if variant not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of "
                          f"{', '.join(PRESETS)} (optionally with '/PATCH', e.g. 'B/16', '22B/14')")
    if patch and not patch.isdigit():
        raise ConfigError(f"preset {name!r}: the part after '/' must be a patch size, e.g. 'B/16'")
    return variant, int(patch) if patch else None


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name such as 'B/16' or '22B/14', with field overrides."""
    variant, patch = parse_preset(name)
    width, depth, mlp_dim, num_heads = PRESETS[variant]
    fields: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch is not None:
        fields["patch_size"] = patch
    fields.update(overrides)
    return ModelConfig.from_dict(fields)
