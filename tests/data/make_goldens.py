"""Make the standard-ViT golden files in tests/data/timm_vit/ with timm itself (needs torch + timm).

How they were made (timm 1.0.31, torch 2.14.1 CPU, from the repository root):

    python -m venv /work/venv-timm && /work/venv-timm/bin/pip install torch timm numpy safetensors
    /work/venv-timm/bin/python tests/data/make_goldens.py                     # step 1: timm only
    /work/venv-timm/bin/python tests/data/make_goldens.py --check-vit22b-export  # step 2

Step 1 builds each family below with random weights (every tensor, seed 0, so a wrong transpose or
order shows) and writes `<family>.safetensors`: `param/<timm key>` (torch layouts), `input_nhwc`
and timm's float32 `logits`. For the .npz families it also writes big_vision checkpoints in the
layout `timm.models.vision_transformer._load_weights` reads (written here from timm's tensors),
loads each into a fresh timm model with that loader and stores the logits it gives.

Step 2 runs vit22b (system python with the repo's src/ on PYTHONPATH; `--vit22b-python`) to import
each golden and export it to .npz, loads those exports into timm with `_load_weights`, and writes
`<family>_from_vit22b.npz` plus timm's logits on it (`vit22b_export_logits.safetensors`): the tests
check that vit22b still exports exactly those arrays. Nothing in tests/ needs torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.numpy import load_file, save_file
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer, _load_weights

OUT = Path(__file__).parent / "timm_vit"
BASE = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2,
            num_heads=4, mlp_ratio=2.0)
# family -> (VisionTransformer kwargs beyond BASE, the timm model family it stands for)
FAMILIES = {
    "augreg": (dict(), "class-token ViT: vit_*_patch*_224.augreg_*, DeiT (no distillation token)"),
    "gap_fcnorm": (dict(global_pool="avg"), "GAP over patch tokens + fc_norm (timm's default for avg, MAE)"),
    "siglip": (dict(class_token=False, global_pool="map"), "MAP head, no class token: vit_*_siglip_*"),
    "clip": (dict(pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5), act_layer="quick_gelu"),
             "pre-norm CLIP tower: vit_*_clip_quickgelu_224 (LayerNorm eps 1e-5, QuickGELU, no patch bias)"),
    "dinov2_reg": (dict(img_size=28, patch_size=7, init_values=1e-5, reg_tokens=4,
                        no_embed_class=True, num_classes=0),
                   "LayerScale + 4 registers, posemb on patches only: vit_*_reg4_dinov2"),
    "dinov2": (dict(init_values=1e-5, qk_norm=True), "LayerScale, class token with posemb row "
               "(vit_*_dinov2), plus timm's qk_norm"),
}
NPZ = {  # file -> (family, layout, prefix, scanned, bfloat16)
    "augreg.npz": ("augreg", "augreg", "", False, False),
    "siglip_scanned.npz": ("siglip", "big_vision", "params/img/", True, False),
    "siglip_bf16.npz": ("siglip", "big_vision", "params/img/", False, True),
}


def build(family: str) -> VisionTransformer:
    return VisionTransformer(**{**BASE, **FAMILIES[family][0]}).eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_pre.weight",
                              "fc_norm.weight", "q_norm.weight", "k_norm.weight", "ls1.gamma",
                              "ls2.gamma")):
                p.copy_(1.0 + 0.2 * n)
            elif name.endswith("bias"):
                p.copy_(0.2 * n)
            elif p.ndim <= 3 and name in ("pos_embed", "cls_token", "reg_token", "attn_pool.latent"):
                p.copy_(0.5 * n)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(n / fan_in**0.5)


def logits(model: VisionTransformer, x_nhwc: np.ndarray) -> np.ndarray:
    """timm's forward in float64 (returned as float32). Why not float32: in one generation run this
    torch build's float32 forward of `dinov2_reg` gave batch element 1 logits 3.09 off (element 0
    exact), reproducibly inside that run; float64 agrees with a fresh float32 run to 1e-6."""
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        f64 = copy.deepcopy(model).double()(x.double()).numpy()
        f32 = model(x).numpy()
    if np.abs(f64 - f32).max() > 1e-4:
        print(f"warning: timm float32 forward is {np.abs(f64 - f32).max():.3g} off its float64 one")
    return f64.astype(np.float32)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) as 2-byte void, as ml_dtypes arrays are saved."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.view("V2")


def from_bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def state_to_npz(sd: dict[str, np.ndarray], depth: int, heads: int, layout: str, prefix: str,
                 scanned: bool) -> dict[str, np.ndarray]:
    """A big_vision / AugReg checkpoint dict, written to the names and shapes _load_weights reads."""
    big = layout == "big_vision"
    mha, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big else \
        ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    D = sd["patch_embed.proj.weight"].shape[0]
    hd = D // heads
    w: dict[str, np.ndarray] = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                                "embedding/bias": sd["patch_embed.proj.bias"],
                                "Transformer/encoder_norm/scale": sd["norm.weight"],
                                "Transformer/encoder_norm/bias": sd["norm.bias"]}
    w["pos_embedding" if big else "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    if "cls_token" in sd:
        w["cls"] = sd["cls_token"]
    if "head.weight" in sd:
        w["head/kernel"], w["head/bias"] = sd["head.weight"].T, sd["head.bias"]

    def attention(out: dict, dst: str, q, k, v, qb, kb, vb, o, ob) -> None:
        for n, kern, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{dst}{n}/kernel"] = kern.T.reshape(D, heads, hd)
            out[f"{dst}{n}/bias"] = b.reshape(heads, hd)
        out[f"{dst}out/kernel"], out[f"{dst}out/bias"] = o.T.reshape(heads, hd, D), ob

    if "attn_pool.latent" in sd:
        a = "attn_pool."
        kw, vw = np.split(sd[a + "kv.weight"], 2)
        kb, vb = np.split(sd[a + "kv.bias"], 2)
        attention(w, "MAPHead_0/MultiHeadDotProductAttention_0/", sd[a + "q.weight"], kw, vw,
                  sd[a + "q.bias"], kb, vb, sd[a + "proj.weight"], sd[a + "proj.bias"])
        w["MAPHead_0/probe"] = sd[a + "latent"]
        w["MAPHead_0/LayerNorm_0/scale"] = sd[a + "norm.weight"]
        w["MAPHead_0/LayerNorm_0/bias"] = sd[a + "norm.bias"]
        for r in range(2):
            w[f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel"] = sd[f"{a}mlp.fc{r + 1}.weight"].T
            w[f"MAPHead_0/MlpBlock_0/Dense_{r}/bias"] = sd[f"{a}mlp.fc{r + 1}.bias"]
    blocks = []
    for i in range(depth):
        b, blk = f"blocks.{i}.", {}
        qw, kw, vw = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        attention(blk, f"{mha}/", qw, kw, vw, qb, kb, vb, sd[b + "attn.proj.weight"],
                  sd[b + "attn.proj.bias"])
        blk["LayerNorm_0/scale"], blk["LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        blk[f"{ln2}/scale"], blk[f"{ln2}/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for r in range(2):
            blk[f"{mlp}/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            blk[f"{mlp}/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
        blocks.append(blk)
    for name in blocks[0]:
        if scanned:
            w[f"Transformer/encoderblock/{name}"] = np.stack([blk[name] for blk in blocks])
        else:
            for i, blk in enumerate(blocks):
                w[f"Transformer/encoderblock_{i}/{name}"] = blk[name]
    return {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in w.items()}


def load_npz_into_timm(family: str, path: Path) -> VisionTransformer:
    model = build(family)
    _load_weights(model, str(path))
    return model


def step1() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    summary = {}
    for family, (kwargs, what) in FAMILIES.items():
        torch.manual_seed(0)
        model = build(family)
        randomise(model)
        xi = x[:, :model.patch_embed.img_size[0], :model.patch_embed.img_size[1]].copy()
        sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        out = {f"param/{k}": v for k, v in sd.items()}
        out["input_nhwc"] = xi
        out["logits"] = logits(model, xi)
        shown = {k: repr(v) if callable(v) else v for k, v in kwargs.items()}
        meta = {"family": family, "stands_for": what, "timm": timm.__version__, "torch": torch.__version__,
                "kwargs": json.dumps({**BASE, **shown})}
        save_file(out, str(OUT / f"{family}.safetensors"), metadata=meta)
        summary[family] = {"params": len(sd), "logits_shape": list(out["logits"].shape), "what": what}
        for fname, (fam, layout, prefix, scanned, bf16) in NPZ.items():
            if fam != family:
                continue
            w = state_to_npz(sd, BASE["depth"], BASE["num_heads"], layout, prefix, scanned)
            if bf16:  # stored as bfloat16; timm's reference logits are for the rounded weights
                stored = {k: to_bf16_bits(v) for k, v in w.items()}
                np.savez(OUT / fname, **stored)
                with tempfile.TemporaryDirectory() as tmp:
                    rounded = {k: from_bf16_bits(v) for k, v in stored.items()}
                    np.savez(Path(tmp) / "r.npz", **rounded)
                    ref = logits(load_npz_into_timm(family, Path(tmp) / "r.npz"), xi)
            else:
                np.savez(OUT / fname, **w)
                ref = logits(load_npz_into_timm(family, OUT / fname), xi)
                diff = float(np.abs(ref - out["logits"]).max())
                assert diff < 1e-6, f"{fname}: _load_weights gives logits {diff} away from the model's"
            save_file({"logits": ref, "input_nhwc": xi},
                      str(OUT / fname.replace(".npz", "_logits.safetensors")),
                      metadata={"made_by": "timm _load_weights", "timm": timm.__version__})
            summary[fname] = {"family": family, "layout": layout, "prefix": prefix, "scanned": scanned,
                              "bfloat16": bf16}
    (OUT / "goldens.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# family -> vit22b import flags (what shapes can't show) and export flags
EXPORTS = {
    "augreg": (["--num-heads", "4", "--gelu", "exact"], ["--npz-layout", "augreg"]),
    "siglip": (["--num-heads", "4", "--gelu", "exact"], ["--npz-prefix", "params/img/", "--npz-scan"]),
}


def step2(python: str) -> None:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "XLA_FLAGS": ""}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, (import_flags, export_flags) in EXPORTS.items():
            src, model_dir = OUT / f"{family}.safetensors", Path(tmp) / family
            dst = OUT / f"{family}_from_vit22b.npz"
            for argv in (["import", str(src), "--out", str(model_dir), *import_flags],
                         ["export", str(model_dir), str(dst), *export_flags]):
                subprocess.run([python, "-m", "vit22b.cli", *argv], env=env, check=True)
            golden = load_file(str(src))
            got = logits(load_npz_into_timm(family, dst), golden["input_nhwc"])
            diff = float(np.abs(got - golden["logits"]).max())
            print(f"{dst.name}: timm _load_weights logits differ from timm's golden by {diff:.2e}")
            assert diff < 1e-5
            results[f"{family}_from_vit22b"] = got
    save_file(results, str(OUT / "vit22b_export_logits.safetensors"),
              metadata={"made_by": "timm _load_weights on vit22b's .npz exports", "timm": timm.__version__})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-vit22b-export", action="store_true", help="step 2 (needs vit22b)")
    ap.add_argument("--vit22b-python", default="python3", help="a python with vit22b's dependencies")
    args = ap.parse_args()
    torch.set_num_threads(1)
    step2(args.vit22b_python) if args.check_vit22b_export else step1()
    sys.exit(0)
