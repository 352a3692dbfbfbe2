"""`vit22b import` / `vit22b export`: timm .safetensors and big_vision .npz in and out.

`import-timm` and `export-timm` stay as aliases of the same commands.
"""

from __future__ import annotations

import argparse
from typing import Any

_GELU = {"exact": dict(act="gelu", gelu_approximate=False), "tanh": dict(act="gelu", gelu_approximate=True),
         "quick": dict(act="quick_gelu")}


def cmd_import(args: argparse.Namespace) -> int:
    from vit22b.api import import_weights

    flags: dict[str, Any] = dict(num_heads=args.num_heads, head_dim=args.head_dim, norm=args.norm,
                                 qk_norm_type=args.qk_norm_type, norm_eps=args.norm_eps, head=args.head,
                                 class_posemb=args.class_posemb, **_GELU.get(args.gelu, {}))
    cfg = import_weights(args.src, args.out, timm_model=args.timm_model, variant=args.variant, **flags)
    extras = [f"{k}={getattr(cfg, k)}" for k in ("class_token", "num_registers", "class_posemb",
                                                   "pre_norm", "fc_norm", "layer_scale") if getattr(cfg, k)]
    act = cfg.act if cfg.act != "gelu" else "gelu (tanh)" if cfg.gelu_approximate else "gelu (exact)"
    print(f"wrote {args.out}/model.safetensors ({cfg.width}w x {cfg.depth}d, {cfg.num_classes} classes; "
          f"{cfg.block} blocks, {cfg.num_heads} heads, {cfg.image_size}px / patch {cfg.patch_size}, "
          f"head {cfg.head}, norm {cfg.norm} eps {cfg.norm_eps}, {act}"
          + "".join(f", {e}" for e in extras) + f"); config: {args.out}/config.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vit22b.api import export_weights

    dst = export_weights(args.checkpoint, args.dst, npz_layout=args.npz_layout,
                         npz_prefix=args.npz_prefix, npz_scan=args.npz_scan)
    print(f"wrote {dst}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("import", aliases=["import-timm"],
                       help="timm .safetensors or big_vision .npz -> vit22b model dir")
    p.add_argument("src", help="a timm state dict (.safetensors) or a big_vision/AugReg checkpoint (.npz)")
    p.add_argument("--out", required=True, help="model dir to write (model.safetensors + config.json)")
    g = p.add_argument_group("what the tensors cannot show (default: detected, else as noted)")
    g.add_argument("--timm-model", default=None,
                   help="timm model name, e.g. vit_base_patch16_224.augreg_in21k: heads, eps, activation")
    g.add_argument("--variant", default=None, help="big_vision variant of an .npz, e.g. So400m/14, B/16")
    g.add_argument("--num-heads", type=int, default=None,
                   help="default: width / head_dim (timm weights); the .npz shows it")
    g.add_argument("--head-dim", type=int, default=None, help="default 64 (when --num-heads is not given)")
    g.add_argument("--gelu", choices=sorted(_GELU), default=None,
                   help="default exact for timm (its 'gelu'), tanh for .npz (flax's nn.gelu); quick: "
                        "OpenAI CLIP's QuickGELU")
    g.add_argument("--norm-eps", type=float, default=None, help="default 1e-6 (timm CLIP: 1e-5)")
    g.add_argument("--norm", choices=["layer", "rms"], default=None,
                   help="default layer (timm's LayerNorm); rms for timm's RmsNorm")
    g.add_argument("--qk-norm-type", choices=["layer", "rms"], default=None,
                   help="if q/k norms differ from the others")
    g.add_argument("--head", choices=["token", "gap", "map"], default=None,
                   help="pooling (default: map with attn_pool, token with a class token and no fc_norm, "
                        "else gap)")
    g.add_argument("--class-posemb", action=argparse.BooleanOptionalAction, default=None,
                   help="the class token has its own posemb row (default: as the row count shows)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", aliases=["export-timm"],
                       help="vit22b model dir -> timm .safetensors, or big_vision .npz (by DST's suffix)")
    p.add_argument("checkpoint")
    p.add_argument("dst", help="*.safetensors (timm state dict) or *.npz (what timm's _load_weights reads)")
    p.add_argument("--npz-layout", choices=["big_vision", "augreg"], default=None,
                   help="default augreg when the class token has a posemb row, else big_vision")
    p.add_argument("--npz-prefix", default="", help="e.g. params/img/ (SigLIP image tower), params/")
    p.add_argument("--npz-scan", action="store_true", help="stack the blocks (Transformer/encoderblock/)")
    p.set_defaults(func=cmd_export)
