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
Act = Literal["gelu", "quick_gelu"]


# How a model runs, not what it is: every parameter's shape is the same whatever these say, so a
# work dir may resume with another remat policy or with collective matmul on (workdir.py).
EXECUTION_FIELDS = ("dtype_mm", "dtype_act", "attention", "attention_block", "out_projection",
                    "fused_layout", "scan", "remat", "collective_matmul")


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
    # --- elements of other ViTs (timm, big_vision checkpoints); defaults = ViT-22B, i.e. off ----
    # A learned class token prepended to the patch tokens. None: exactly when head="token" (so
    # configs written before this switch keep their meaning); True also with gap/map pooling.
    class_token: bool | None = None
    num_registers: int = 0  # learned register tokens after the class token (DINOv2 "reg")
    # The prefix tokens (class, registers) get their own learned posemb rows, added after they are
    # prepended (timm's default, the original ViT/DeiT/CLIP); False: the posemb covers the patches
    # only and is added before the tokens are prepended (big_vision, ViT-22B, timm no_embed_class).
    class_posemb: bool = False
    pre_norm: bool = False  # a norm between posemb and the first block (CLIP's norm_pre)
    # The final norm on the pooled features instead of on every token (timm's fc_norm, its
    # default for global average pooling); the tokens in `encoded` are then un-normalised.
    fc_norm: bool = False
    layer_scale: bool = False  # per-channel learned scales on both branches (CaiT/DINOv2), sequential
    act: Act = "gelu"  # "quick_gelu": x * sigmoid(1.702 x), OpenAI CLIP's MLP activation
    head_bias_init: float = 0.0  # -10 for JFT-style sigmoid training (big_vision)
    # --- small-data option, off for the paper -------------------------------------------------
    # Channels of a 3x3 convolution (stride 1, GELU) applied to the pixels before the patch
    # embedding, which then patchifies its output; 0: the paper's plain patch embedding. After Xiao
    # et al. 2021 ("Early Convolutions Help Transformers See Better"); the token count and the
    # encoder are unchanged. It did not help on Fashion-MNIST, in the recipe search or in a 2-hour run
    # (README: "Real data").
    conv_stem_channels: int = 0
    # --- numerics and memory ----------------------------------------------------------------
    dtype_mm: str = "bfloat16"  # matmul inputs; accumulation is always float32
    # Storage of the blocks' projection outputs (q, k, v, MLP hidden) between the matmuls and the
    # elementwise passes. "bfloat16" halves that memory traffic (norm and softmax statistics are
    # still computed in float32; the residual stream stays float32); see bench/README.md.
    dtype_act: str = "float32"
    # "xla" (jax.nn.dot_product_attention; cuDNN on GPUs), "heads_major" (the same arithmetic as
    # [B, H]-batched matmuls: faster on CPUs), "blockwise" (attention.py: online softmax, memory
    # linear in tokens) or "auto" (on CPU blockwise from layers.BLOCKWISE_FROM_TOKENS keys on, else
    # heads_major; xla elsewhere).
    attention: str = "auto"
    attention_block: int = 128  # keys per block of the blockwise kernel
    # The parallel block's out-projection: "split" runs the attention-out and MLP-out matmuls on the
    # fused kernel's two row blocks and sums them (no concatenate of their inputs; with heads-major
    # attention +6-7% S/16 img/s on CPU, README "Performance"); "fused" is one matmul on the
    # concatenation, the paper's literal form. Same parameters; collective_matmul always fuses.
    out_projection: str = "split"
    # How the parallel block multiplies its fused kernels (stored per head either way, encoder.py):
    # "per_head" as stored ([D, H, 3hd + M/H]: each model device multiplies its own heads);
    # "contiguous" regrouped q | k | v | mlp into one [D, 3D + M] matrix inside the step (timm's
    # layout: larger, simpler matmuls; faster on CPU, README "Performance"); "auto": contiguous
    # unless the mesh has a model axis, where the per-head layout is the paper's sharding.
    fused_layout: str = "auto"
    scan: bool = True  # lax.scan over layers: compile time flat in depth
    # A jax.checkpoint_policies name, "none", or "auto": the trainer asks the planner for the
    # platform's fastest policy that fits the device (plan.auto_remat); outside the trainer (no
    # batch or mesh to plan for) "auto" means "nothing_saveable".
    remat: str = "auto"
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
    def patch_in_channels(self) -> int:
        """Channels the patch embedding sees: the conv stem's output, else the image's."""
        return self.conv_stem_channels or self.in_channels

    @property
    def has_class_token(self) -> bool:
        return self.head == "token" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, then the registers."""
        return int(self.has_class_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

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
        if self.block == "parallel":
            need(self.out_bias or not self.mlp_bias,
                 "out_bias=False changes nothing in the parallel block: the attention-out and MLP-out "
                 "outputs are summed, so they share one fused bias. Drop it with --no-mlp-bias "
                 "--no-out-bias, or use --block sequential for a separate attention-out bias.")
        if self.posemb == "sincos2d":
            need(self.width % 4 == 0, f"posemb 'sincos2d' needs width divisible by 4, got {self.width}")
        need(not (self.head == "token" and self.class_token is False),
             "head='token' pools the class token: set class_token=True (or None), or pick another head")
        need(self.num_registers >= 0, f"num_registers must be >= 0, got {self.num_registers}")
        need(self.conv_stem_channels >= 0,
             f"conv_stem_channels must be >= 0 (0: no conv stem), got {self.conv_stem_channels}")
        need(not self.class_posemb or self.num_prefix_tokens > 0,
             "class_posemb=True gives the prefix tokens posemb rows, but there are none: add "
             "class_token=True or registers, or set class_posemb=False")
        need(not self.layer_scale or self.block == "sequential",
             "layer_scale scales the attention and MLP branches separately, which the parallel "
             "block's fused out-projection sums: use block='sequential' or layer_scale=False")
        need(not self.fc_norm or self.head != "none",
             "fc_norm normalises the pooled features but head='none' pools nothing: pick a head")
        need(not (self.collective_matmul and self.block == "sequential"),
             "collective_matmul overlaps the parallel block's fused projections (paper Fig. 3); "
             "the sequential block has none: drop collective_matmul or use block='parallel'")
        for name, allowed in (("block", Block), ("norm", Norm), ("head", Head), ("posemb", Posemb),
                              ("act", Act)):
            need(getattr(self, name) in allowed.__args__,
                 f"{name}={getattr(self, name)!r} is not one of {allowed.__args__}")
        need(self.qk_norm_type in (None, "rms", "layer"),
             f"qk_norm_type={self.qk_norm_type!r} is not one of None, 'rms', 'layer'")
        need(self.dtype_mm in ("bfloat16", "float32", "float16"),
             f"dtype_mm={self.dtype_mm!r}: use 'bfloat16', 'float16' or 'float32'")
        need(self.attention in ("auto", "xla", "heads_major", "blockwise"),
             f"attention={self.attention!r}: use 'auto', 'xla', 'heads_major' or 'blockwise'")
        need(self.out_projection in ("split", "fused"),
             f"out_projection={self.out_projection!r}: use 'split' or 'fused'")
        need(self.fused_layout in ("auto", "per_head", "contiguous"),
             f"fused_layout={self.fused_layout!r}: use 'auto', 'per_head' or 'contiguous'")
        need(self.attention_block > 0, f"attention_block must be positive, got {self.attention_block}")
        need(self.dtype_act in ("bfloat16", "float32"),
             f"dtype_act={self.dtype_act!r}: use 'float32' or 'bfloat16'")
        need(math.isfinite(self.norm_eps) and self.norm_eps > 0,
             f"norm_eps={self.norm_eps}: use a small positive number, e.g. 1e-6")
        need(math.isfinite(self.head_bias_init), f"head_bias_init={self.head_bias_init}: use a finite "
             "number, e.g. 0 or -log(classes - 1)")
        if self.remat not in ("none", "auto"):  # checked here, not when the step is traced
            import jax

            need(callable(getattr(jax.checkpoint_policies, self.remat, None)),
                 f"remat={self.remat!r}: use 'auto', 'none' or a jax.checkpoint_policies name, e.g. "
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
