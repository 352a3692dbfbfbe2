"""Analytic FLOPs per image, the numerator of MFU.

Counts matmuls (2 FLOPs per multiply-add) and attention's two batched matmuls; elementwise work
(norms, GELU, softmax) is left out, as in the PaLM/MaxText MFU convention. A training step is
3x the forward pass (backward = 2x forward); rematerialisation's recompute is *not* counted, so
MFU measures useful work only. tests/test_flops.py checks this against XLA's own count.
"""

from __future__ import annotations

from vit22b.config import ModelConfig


def flops_per_image(cfg: ModelConfig) -> dict[str, int]:
    D, M, L, C = cfg.width, cfg.mlp_dim, cfg.depth, cfg.num_classes
    N = cfg.num_patches
    T = cfg.num_tokens  # tokens through the encoder (class token and registers included)
    patch = 2 * N * cfg.patch_size**2 * cfg.patch_in_channels * D
    # The optional 3x3 conv stem, at full resolution, counted with the patch embedding.
    patch += 2 * cfg.image_size**2 * 9 * cfg.in_channels * cfg.conv_stem_channels
    # Fused in (D -> 3D + M) and out (D + M -> D) projections; the sequential block has the same
    # matmuls unfused. Attention: q.k^T and p.v, each 2*T*T*D.
    block_matmuls = 2 * T * D * (3 * D + M) + 2 * T * (D + M) * D
    block_attention = 2 * 2 * T * T * D
    encoder = L * (block_matmuls + block_attention)
    head = 0
    if cfg.head == "map":
        head = 2 * D * D + 2 * T * D * 2 * D + 2 * 2 * T * D + 2 * D * D + 2 * 2 * D * M
    pooled_tokens = N if cfg.head == "none" else 1
    classifier = 2 * pooled_tokens * D * C
    forward = patch + encoder + head + classifier
    return {"patch_embed": patch, "encoder": encoder, "map_head": head, "classifier": classifier,
            "forward": forward, "train": 3 * forward}
