"""big_vision / AugReg `.npz` checkpoints to and from vit22b, with numpy only (never unpickled).

The reference reader is timm's `timm.models.vision_transformer._load_weights`; this module reads
and writes exactly the names and shapes it does, going through timm's standard-ViT state dict
(numpy, torch layouts) so that timm_vit.py does the rest:

  big_vision  prefix params/, params/img/ (the SigLIP image tower) or none; posemb
              `pos_embedding` [1, N, D], added before a class token is prepended; block i:
              LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
  augreg      prefix none or opt/target/ (google-research ViT); posemb
              `Transformer/posembed_input/pos_embedding` [1, 1 + N, D] (class token row first);
              block i: LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3
Blocks are `Transformer/encoderblock_{i}/...` or scanned `Transformer/encoderblock/...` with a
leading layer axis. Attention kernels are [D, H, hd] (so the head count is in the file), out
[H, hd, D]; Dense kernels [in, out]; the patch kernel [p, p, C, D]. Arrays stored as bfloat16
(ml_dtypes, saved as 2-byte void) are widened to float32 exactly.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vit22b.config import PRESETS, ConfigError, ModelConfig, parse_preset
from vit22b.timm_vit import detect_config

Flat = dict[str, np.ndarray]
_PREFIXES = ("opt/target/", "params/img/", "params/")


class _Used(dict):
    """The npz arrays, remembering which names were read."""

    def __init__(self, w: Flat, prefix: str):
        super().__init__(w)
        self.prefix, self.used = prefix, set()

    def get_(self, name: str, idx: int | None = None) -> np.ndarray:
        key = self.prefix + name
        if key not in self:
            raise ConfigError(f"the .npz lacks {key!r}, which this layout needs: the file is not a "
                              "big_vision/AugReg ViT or was cut short")
        self.used.add(key)
        a = self[key]
        return a if idx is None else a[idx]


def read_npz(path: str | Path) -> Flat:
    """All arrays of an .npz as float32 (bfloat16-stored ones widened exactly)."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} is not a readable numpy .npz without pickles ({e}); re-save it "
                          "with numpy.savez") from e
    out = {}
    for k, a in raw.items():
        if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # ml_dtypes bfloat16, as np.save writes it
            a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif a.dtype.kind not in "fiu":
            raise ConfigError(f"{path}: array {k!r} has dtype {a.dtype}, not a number type")
        out[k] = np.asarray(a, np.float32)
    return out


def detect_layout(w: Flat) -> tuple[str, str, bool]:
    """(prefix, 'big_vision' | 'augreg', scanned) as timm's loader decides them."""
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in w), "")
    if f"{prefix}embedding/kernel" not in w:
        raise ConfigError("the .npz has no 'embedding/kernel' (nor under params/, params/img/, "
                          "opt/target/): not a big_vision/AugReg ViT checkpoint")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    big = prefix.startswith("params/") or f"{prefix}pos_embedding" in w or scanned
    return prefix, "big_vision" if big else "augreg", scanned


def _names(layout: str) -> tuple[str, str, str]:
    return (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if layout == "big_vision"
            else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))


def npz_to_timm(w: Flat) -> tuple[Flat, dict[str, Any]]:
    """A big_vision/AugReg checkpoint -> timm's state dict, plus what the file shows (layout, heads)."""
    prefix, layout, scanned = detect_layout(w)
    f = _Used(w, prefix)
    mha, ln2, mlp = _names(layout)
    sd: Flat = {"patch_embed.proj.weight": f.get_("embedding/kernel").transpose(3, 2, 0, 1),
                "patch_embed.proj.bias": f.get_("embedding/bias"),
                "pos_embed": f.get_("pos_embedding" if layout == "big_vision"
                                    else "Transformer/posembed_input/pos_embedding"),
                "norm.weight": f.get_("Transformer/encoder_norm/scale"),
                "norm.bias": f.get_("Transformer/encoder_norm/bias")}
    if prefix + "cls" in w:
        sd["cls_token"] = f.get_("cls")
    if prefix + "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = f.get_("head/kernel").T, f.get_("head/bias")

    def attention(dst: str, src: str, idx: int | None, fused_kv: bool) -> int:
        k = {n: f.get_(f"{src}{n}/kernel", idx) for n in ("query", "key", "value", "out")}
        b = {n: f.get_(f"{src}{n}/bias", idx) for n in ("query", "key", "value", "out")}
        D = k["query"].shape[0]
        cols = {n: k[n].reshape(D, -1).T for n in ("query", "key", "value")}
        if fused_kv:
            sd[dst + "q.weight"], sd[dst + "q.bias"] = cols["query"], b["query"].reshape(-1)
            sd[dst + "kv.weight"] = np.concatenate([cols["key"], cols["value"]])
            sd[dst + "kv.bias"] = np.concatenate([b["key"].reshape(-1), b["value"].reshape(-1)])
        else:
            sd[dst + "qkv.weight"] = np.concatenate([cols[n] for n in ("query", "key", "value")])
            sd[dst + "qkv.bias"] = np.concatenate([b[n].reshape(-1) for n in ("query", "key", "value")])
        sd[dst + "proj.weight"] = k["out"].reshape(-1, D).T
        sd[dst + "proj.bias"] = b["out"]
        return k["query"].shape[1]

    def dense_and_norm(dst: str, src: str, norm_pairs: list[tuple[str, str]], mlp_src: str,
                       idx: int | None) -> None:
        for npz_name, timm_name in norm_pairs:
            sd[f"{dst}{timm_name}.weight"] = f.get_(f"{src}{npz_name}/scale", idx)
            sd[f"{dst}{timm_name}.bias"] = f.get_(f"{src}{npz_name}/bias", idx)
        for r in range(2):
            sd[f"{dst}mlp.fc{r + 1}.weight"] = f.get_(f"{src}{mlp_src}/Dense_{r}/kernel", idx).T
            sd[f"{dst}mlp.fc{r + 1}.bias"] = f.get_(f"{src}{mlp_src}/Dense_{r}/bias", idx)

    if prefix + "MAPHead_0/probe" in w:
        sd["attn_pool.latent"] = f.get_("MAPHead_0/probe")
        attention("attn_pool.", "MAPHead_0/MultiHeadDotProductAttention_0/", None, fused_kv=True)
        dense_and_norm("attn_pool.", "MAPHead_0/", [("LayerNorm_0", "norm")], "MlpBlock_0", None)
    if scanned:
        depth = w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = 1 + max((int(m.group(1)) for k in w
                         if (m := re.match(rf"{re.escape(prefix)}Transformer/encoderblock_(\d+)/", k))),
                        default=-1)
    if depth < 1:
        raise ConfigError("the .npz has no Transformer/encoderblock_0/ nor a scanned "
                          "Transformer/encoderblock/: not a ViT checkpoint")
    heads = 0
    for i in range(depth):
        src, idx = ("Transformer/encoderblock/", i) if scanned else (f"Transformer/encoderblock_{i}/", None)
        heads = attention(f"blocks.{i}.attn.", f"{src}{mha}/", idx, fused_kv=False)
        dense_and_norm(f"blocks.{i}.", src, [("LayerNorm_0", "norm1"), (ln2, "norm2")], mlp, idx)
    unused = sorted(k for k in w if k.startswith(prefix) and k not in f.used)
    if unused:
        raise ConfigError(f"npz tensor {unused[0]!r} has no counterpart in a standard ViT "
                          f"({len(unused)} unused, e.g. a pre_logits layer): refusing a partial import")
    return sd, {"prefix": prefix, "layout": layout, "scanned": scanned, "num_heads": heads}


def config_from_npz(sd: Flat, facts: dict[str, Any], *, variant: str | None = None,
                    num_heads: int | None = None, head_dim: int | None = None,
                    **overrides: Any) -> ModelConfig:
    """The config of a converted npz: what the file shows (head count included, so head_dim is
    not needed), flax's GELU (tanh) unless told, and a big_vision variant name ('So400m/14')
    checked against the shapes."""
    if num_heads and num_heads != facts["num_heads"]:
        raise ConfigError(f"num_heads={num_heads} contradicts the .npz, whose attention kernels have "
                          f"{facts['num_heads']} heads: drop --num-heads")
    fields: dict[str, Any] = dict(gelu_approximate=True, num_heads=num_heads or facts["num_heads"])
    if facts["layout"] == "big_vision":
        fields["class_posemb"] = False  # big_vision adds the posemb before prepending a class token
    if variant:
        name, patch = parse_preset(variant)
        width, depth, mlp_dim, heads = PRESETS[name]
        fields["num_heads"] = num_heads or heads
        seen = detect_config(sd, num_heads=fields["num_heads"], class_posemb=fields.get("class_posemb"))
        want = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                    patch_size=patch or seen.patch_size)
        got = {k: getattr(seen, k) for k in want}
        if got != want:
            bad = next(k for k in want if got[k] != want[k])
            raise ConfigError(f"--variant {variant}: the file has {bad}={got[bad]}, the variant "
                              f"{want[bad]}: pick the variant the checkpoint was trained as")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return detect_config(sd, **fields)


def _check_exportable(cfg: ModelConfig, layout: str) -> None:
    problems = [name for name, bad in (
        ("block='sequential'", cfg.block != "sequential"), ("norm='layer'", cfg.norm != "layer"),
        ("norm_bias, qkv_bias, mlp_bias, out_bias, patch_bias", not (
            cfg.norm_bias and cfg.qkv_bias and cfg.mlp_bias and cfg.out_bias and cfg.patch_bias)),
        ("map_bias with head='map'", cfg.head == "map" and not cfg.map_bias),
        ("posemb='learn'", cfg.posemb != "learn"), ("no qk_norm", cfg.qk_norm),
        ("no registers, pre_norm, fc_norm or layer_scale",
         cfg.num_registers or cfg.pre_norm or cfg.fc_norm or cfg.layer_scale)) if bad]
    if layout == "big_vision" and cfg.class_posemb:
        problems.append("class_posemb=False for the big_vision layout (use --npz-layout augreg)")
    if layout == "augreg" and cfg.class_posemb != cfg.has_class_token:
        problems.append("the AugReg layout's posemb has a class-token row exactly when there is a "
                        "class token (use --npz-layout big_vision)")
    if problems:
        raise ConfigError("this model does not fit a big_vision/AugReg .npz, which needs "
                          + "; ".join(problems) + ": export to timm .safetensors instead")


def timm_to_npz(sd: Flat, cfg: ModelConfig, *, layout: str | None = None, prefix: str = "",
                scan: bool = False) -> Flat:
    """timm's state dict -> npz arrays in the layout timm's `_load_weights` reads (npz_to_timm's inverse)."""
    layout = layout or ("augreg" if cfg.class_posemb else "big_vision")
    if layout not in ("big_vision", "augreg"):
        raise ConfigError(f"npz layout {layout!r}: use 'big_vision' or 'augreg'")
    _check_exportable(cfg, layout)
    D, H, hd = cfg.width, cfg.num_heads, cfg.head_dim
    mha, ln2, mlp = _names(layout)
    w: Flat = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
               "embedding/bias": sd["patch_embed.proj.bias"],
               "Transformer/encoder_norm/scale": sd["norm.weight"],
               "Transformer/encoder_norm/bias": sd["norm.bias"]}
    pos_name = "pos_embedding" if layout == "big_vision" else "Transformer/posembed_input/pos_embedding"
    w[pos_name] = sd["pos_embed"]
    if cfg.has_class_token:
        w["cls"] = sd["cls_token"]
    if cfg.num_classes:
        w["head/kernel"], w["head/bias"] = sd["head.weight"].T, sd["head.bias"]

    def attention(out: Flat, dst: str, q: np.ndarray, kv: np.ndarray, qb: np.ndarray, kvb: np.ndarray,
                  proj: np.ndarray, proj_b: np.ndarray) -> None:
        ws, bs = [q, *np.split(kv, 2)], [qb, *np.split(kvb, 2)]
        for n, a, b in zip(("query", "key", "value"), ws, bs, strict=True):
            out[f"{dst}{n}/kernel"], out[f"{dst}{n}/bias"] = a.T.reshape(D, H, hd), b.reshape(H, hd)
        out[f"{dst}out/kernel"], out[f"{dst}out/bias"] = proj.T.reshape(H, hd, D), proj_b

    def dense_and_norm(out: Flat, dst: str, src: str, norm_pairs: list[tuple[str, str]],
                       mlp_dst: str) -> None:
        for npz_name, timm_name in norm_pairs:
            out[f"{dst}{npz_name}/scale"] = sd[f"{src}{timm_name}.weight"]
            out[f"{dst}{npz_name}/bias"] = sd[f"{src}{timm_name}.bias"]
        for r in range(2):
            out[f"{dst}{mlp_dst}/Dense_{r}/kernel"] = sd[f"{src}mlp.fc{r + 1}.weight"].T
            out[f"{dst}{mlp_dst}/Dense_{r}/bias"] = sd[f"{src}mlp.fc{r + 1}.bias"]

    if cfg.head == "map":
        a = "attn_pool."
        w["MAPHead_0/probe"] = sd[a + "latent"]
        attention(w, "MAPHead_0/MultiHeadDotProductAttention_0/", sd[a + "q.weight"], sd[a + "kv.weight"],
                  sd[a + "q.bias"], sd[a + "kv.bias"], sd[a + "proj.weight"], sd[a + "proj.bias"])
        dense_and_norm(w, "MAPHead_0/", a, [("LayerNorm_0", "norm")], "MlpBlock_0")
    blocks = []
    for i in range(cfg.depth):
        b, blk = f"blocks.{i}.", {}
        q, kv = np.split(sd[b + "attn.qkv.weight"], [D])
        qb, kvb = np.split(sd[b + "attn.qkv.bias"], [D])
        attention(blk, f"{mha}/", q, kv, qb, kvb, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        dense_and_norm(blk, "", b, [("LayerNorm_0", "norm1"), (ln2, "norm2")], mlp)
        blocks.append(blk)
    for name in blocks[0]:
        if scan:
            w[f"Transformer/encoderblock/{name}"] = np.stack([blk[name] for blk in blocks])
        else:
            w.update({f"Transformer/encoderblock_{i}/{name}": blk[name] for i, blk in enumerate(blocks)})
    return {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in w.items()}
