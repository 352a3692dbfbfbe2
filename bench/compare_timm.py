"""vit22b vs timm, the same ViT-22B-style architecture, side by side in one run on one machine.

    pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31    # benchmark-only extra
    python bench/compare_timm.py --presets S/16 B/16 --batch-sizes 8 32 \
        --out bench/results/compare_timm_cpu.json

The architecture is ViT-22B's block at a small size: timm's `VisionTransformer(block_fn=
ParallelScalingBlock(fuse_out_proj=True), qk_norm=True, qkv_bias=False, global_pool='map',
class_token=False, norm_layer=RmsNorm, act_layer='gelu_tanh')` against `vit22b.config.preset(...)`
with the paper's defaults (parallel block, fused projections, QK norm, MAP head, RMS norms). Before
timing, timm's weights are converted (`vit22b.timm_convert`) and both forwards compared in f32,
so the two really compute the same function (the max |logit difference| is in the JSON).

Per (preset, batch, kind) every mode is built and warmed up first (compiles timed), then the
modes are timed round-robin (`common.time_interleaved`): a noisy neighbour slows all alike, and the
ratio vit22b-best / timm-best is measured side by side. Modes:
  timm:   eager f32, torch.compile f32, eager bf16 autocast, torch.compile + bf16 autocast
  vit22b: f32 matmuls, bf16-input/f32-accumulate matmuls (default); train also without remat
  plain:  (only when named in --modes) plain_vit.py, the same function hand-written in jnp, and
          one execution factor at a time from it towards vit22b's defaults (kernel layout, scan,
          remat); its logits are checked against vit22b's before timing. It shows what a plain
          JAX model reaches on the machine, and which of vit22b's choices costs what.
kinds: `train` = forward + backward + AdamW update (lr 1e-4, wd 1e-4, clip 1.0, softmax CE, the
same in both), `infer` = forward only (logits). img/s from the median step. Achieved TFLOP/s uses
vit22b's analytic FLOPs (`flops.py`, 3x forward for train), the same count for both libraries;
each library's matmul peak (bf16 and f32) is measured in the same run and MFU is reported against
the best rate either library reaches on this machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import (
    Row,
    combine_peaks,
    command_line,
    default_peak_sizes,
    hardware,
    hardware_line,
    loadavg,
    markdown_table,
    measure_peak,
    peak_line,
    refuse_if_invalid,
    time_interleaved,
    write_json,
)
from plain_vit import Plain, forward, plain_params, train_step
from vit22b.config import ModelConfig, preset
from vit22b.flops import flops_per_image
from vit22b.model import apply
from vit22b.optim import OptimConfig
from vit22b.train import TrainConfig, make_train_step
from vit22b.train_state import init_state

try:
    import timm
    import torch
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
except ImportError as e:  # a benchmark-only extra
    raise SystemExit(
        f"{e}: install the benchmark extra first: pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31"
    ) from None

TIMM_MODES = ("timm eager f32", "timm compile f32", "timm eager bf16", "timm compile bf16")
OURS = {
    "vit22b f32": {"dtype_mm": "float32"},
    "vit22b bf16": {"dtype_mm": "bfloat16"},
    "vit22b bf16 no-remat": {"dtype_mm": "bfloat16", "remat": "none"},
    "vit22b bf16 act-bf16": {"dtype_mm": "bfloat16", "dtype_act": "bfloat16"},
    # the execution defaults before the split out-projection and heads-major attention
    "vit22b f32 fused-out dpa": {"dtype_mm": "float32", "out_projection": "fused", "attention": "xla"},
    "vit22b f32 unrolled no-remat": {"dtype_mm": "float32", "scan": False, "remat": "none"},
    "vit22b bf16 fused-out dpa": {"dtype_mm": "bfloat16", "out_projection": "fused", "attention": "xla"},
    # the kernels multiplied as stored (per head), as before fused_layout="auto" (contiguous here)
    "vit22b f32 per-head": {"dtype_mm": "float32", "fused_layout": "per_head"},
    "vit22b bf16 per-head": {"dtype_mm": "bfloat16", "fused_layout": "per_head"},
}
# The plain hand-written JAX model (plain_vit.py), and then one execution factor at a time on the
# way to vit22b's own defaults (heads layout, scan, remat auto = dots_saveable on CPU).
PLAIN = {
    "plain f32": Plain(layout="contiguous", loop="unrolled", remat="none"),
    "plain f32 heads-layout": Plain(layout="heads", loop="unrolled", remat="none"),
    "plain f32 heads-layout scan": Plain(layout="heads", loop="scan", remat="none"),
    "plain f32 heads-layout scan dots": Plain(layout="heads", loop="scan", remat="dots_saveable"),
    # vit22b's execution with timm's contiguous kernels: what the layout is worth under scan + remat
    "plain f32 scan dots": Plain(layout="contiguous", loop="scan", remat="dots_saveable"),
}
# modes that differ from another only in remat: timed for training only
REMAT_ONLY = ("vit22b bf16 no-remat", "plain f32 heads-layout scan dots", "plain f32 scan dots")
LR, WD, CLIP = 1e-4, 1e-4, 1.0
DEVICE = "cpu"  # torch's device; --device cuda on a GPU machine (JAX picks its default backend)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timm_model(cfg: ModelConfig) -> torch.nn.Module:
    norm = timm.layers.RmsNorm if cfg.norm == "rms" else partial(timm.layers.LayerNorm, bias=False)
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_channels,
        num_classes=cfg.num_classes,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        block_fn=partial(ParallelScalingBlock, fuse_out_proj=True),
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
        proj_bias=cfg.out_bias,
        class_token=False,
        no_embed_class=True,
        global_pool="map",
        final_norm=True,
        fc_norm=False,
        norm_layer=norm,
        act_layer="gelu_tanh" if cfg.gelu_approximate else "gelu",
    )


def check_same_function(cfg: ModelConfig, model: torch.nn.Module, images: np.ndarray) -> float:
    """timm weights -> vit22b; max |logits difference| / max |logits| in f32 on `images` (NHWC)."""
    from vit22b.api import model_from_params
    from vit22b.timm_convert import timm_to_flat
    from vit22b.weights import unflatten

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    ours = model_from_params(cfg.replace(dtype_mm="float32"), unflatten(timm_to_flat(state, cfg)))
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(ours(jnp.asarray(images))[0])
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def timm_runner(cfg: ModelConfig, mode: str, kind: str, images: np.ndarray, labels: np.ndarray):
    model = timm_model(cfg).to(DEVICE)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).contiguous().to(DEVICE)
    y = torch.from_numpy(labels.astype(np.int64)).to(DEVICE)
    net = torch.compile(model) if "compile" in mode else model
    bf16 = "bf16" in mode
    if kind == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), torch.autocast(DEVICE, torch.bfloat16, enabled=bf16):
                net(x)
            sync()

        return infer

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

    def train() -> None:
        with torch.autocast(DEVICE, torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    return train


def vit22b_runner(cfg: ModelConfig, kind: str, images: np.ndarray, labels: np.ndarray):
    tcfg = TrainConfig(
        model=cfg,
        batch_size=len(images),
        loss="softmax",
        progress=False,
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=LR,
            schedule="cosine",
            warmup_steps=0,
            weight_decay=WD / LR,
            head_wd_mult=1.0,
            grad_clip_norm=CLIP,
            momentum_dtype="float32",
        ),
    )
    graphdef, tx, state, _ = init_state(tcfg)
    x, y = jnp.asarray(images), jnp.asarray(labels)
    if kind == "infer":
        forward = jax.jit(lambda params, x: apply(graphdef, params, x)[0])
        params = state["params"]
        return lambda: forward(params, x).block_until_ready()
    step = make_train_step(graphdef, tx, tcfg)
    holder = {"state": state}

    def train() -> None:
        holder["state"], metrics = step(holder["state"], {"image": x, "label": y})
        jax.block_until_ready(metrics)

    return train


def plain_runner(cfg: ModelConfig, plain: Plain, kind: str, images: np.ndarray, labels: np.ndarray,
                 check: dict[str, float]):
    """plain_vit's model on vit22b's initial parameters (the head made non-zero), after checking
    that its logits equal vit22b's in f32 (max |difference| / max |logit| into `check`)."""
    from vit22b.model import init_model, split_params

    graphdef, params = split_params(init_model(cfg))
    params["head_kernel"] = 0.02 * jax.random.normal(jax.random.key(1), params["head_kernel"].shape)
    flat = plain_params(cfg, params, plain)
    x, y = jnp.asarray(images), jnp.asarray(labels)
    fwd = jax.jit(partial(forward, cfg, plain))
    ref = np.asarray(apply(graphdef, params, x[:2])[0])
    got = np.asarray(fwd(flat, x[:2]))
    check["max_rel_logit_diff_vs_vit22b"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    if kind == "infer":
        return lambda: fwd(flat, x).block_until_ready()
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=WD))
    step = train_step(cfg, plain, tx)
    holder = {"state": (flat, tx.init(flat))}

    def train() -> None:
        params, opt_state, loss = step(*holder["state"], x, y)
        holder["state"] = (params, opt_state)
        jax.block_until_ready(loss)

    return train


def interleaved_peaks(sizes: list[int], repeats: int, torch_bf16: bool = True) -> dict[str, Any]:
    """The matmul peaks of both libraries timed round-robin in one loop, like the models: jax
    bf16->f32 and f32, torch bf16 (if `torch_bf16`, see torch_peak) and f32, best size each; with
    the load seen around each."""
    runners: dict[str, Any] = {}
    torch_forms = (("torch_bf16", torch.bfloat16),) if torch_bf16 else ()
    for n in sizes:
        for name, dtype, acc in (("jax_bf16_f32acc", jnp.bfloat16, jnp.float32),
                                 ("jax_f32", jnp.float32, None)):
            mm = jax.jit(lambda a, b, acc=acc: jnp.matmul(a, b, preferred_element_type=acc))
            a = jax.random.normal(jax.random.key(n), (n, n), jnp.float32).astype(dtype)
            jax.block_until_ready(mm(a, a))
            runners[f"{name}@{n}"] = lambda mm=mm, a=a: jax.block_until_ready(mm(a, a))
        for name, dtype in (*torch_forms, ("torch_f32", torch.float32)):
            t = torch.randn(n, n, dtype=dtype, device=DEVICE)
            t @ t
            runners[f"{name}@{n}"] = lambda t=t: (t @ t, sync())
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, repeats, loads=loads)
    best: dict[str, float] = {}
    for key, ts in times.items():
        name, n = key.split("@")
        best[name] = max(best.get(name, 0.0), 2 * int(n) ** 3 / statistics.median(ts) / 1e12)
    return {"best_tflops": best, "loads": loads, "valid": all(v["valid"] for v in loads.values())}


def torch_peak(sizes: list[int], repeats: int, bf16: bool = True) -> dict[str, float]:
    """torch's best n x n matmul TFLOP/s on DEVICE, f32 and (if `bf16`) bf16. On a CPU without
    AVX-512 BF16 torch falls back to a slow bf16 matmul (1.2 GFLOP/s on a Zen 3, 70x below its
    f32): a 4096^3 one then takes minutes, so it is timed only when a timm bf16 mode is."""
    best = {}
    forms = (("torch_f32", torch.float32), ("torch_bf16", torch.bfloat16))
    for name, dtype in forms if bf16 else forms[:1]:
        rates = []
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
            a @ b
            sync()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                sync()
                times.append(time.perf_counter() - t0)
            rates.append(2 * n**3 / statistics.median(times) / 1e12)
        best[name] = max(rates)
    return best


def bench_one(
    spec: str, image_size: int, batch: int, kind: str, modes: list[str], warmup: int, steps: int, check: bool
) -> list[Row]:
    cfg = preset(spec, image_size=image_size, num_classes=1000)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, image_size, image_size, cfg.in_channels), dtype=np.float32)
    labels = rng.integers(0, cfg.num_classes, batch, dtype=np.int32)
    head = {"preset": spec, "image_size": image_size, "batch": batch, "kind": kind}
    if check:
        torch.manual_seed(0)
        head["max_rel_logit_diff_f32"] = check_same_function(cfg, timm_model(cfg), images[:2])
        print(f"    same function: max |timm - vit22b| / max |logit| = {head['max_rel_logit_diff_f32']:.1e}")
    runners, setup_s, errors, checks = {}, {}, {}, {}
    for mode in modes:
        if kind == "infer" and mode in REMAT_ONLY:
            continue  # remat only matters for the backward pass
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            if mode.startswith("timm"):
                run = timm_runner(cfg, mode, kind, images, labels)
            elif mode.startswith("plain"):
                checks[mode] = {}
                run = plain_runner(cfg.replace(dtype_mm="float32"), PLAIN[mode], kind, images, labels,
                                   checks[mode])
                print(f"    {mode}: same function as vit22b, max |difference| / max |logit| = "
                      f"{checks[mode]['max_rel_logit_diff_vs_vit22b']:.1e}")
            else:
                run = vit22b_runner(cfg.replace(**OURS[mode]), kind, images, labels)
            for _ in range(warmup):  # the first call compiles (jit / torch.compile)
                run()
            runners[mode] = run
        except Exception as e:  # e.g. no C++ compiler for torch.compile: record and go on
            errors[mode] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"    {mode}: {errors[mode]}")
        setup_s[mode] = time.perf_counter() - t0
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, steps, loads=loads)
    flops = flops_per_image(cfg)["train" if kind == "train" else "forward"] * batch
    rows = []
    for mode in runners:
        median = statistics.median(times[mode])
        rows.append(
            {
                **head,
                "mode": mode,
                "library": mode.split()[0],
                "step_ms_median": 1e3 * median,
                "step_ms_all": [1e3 * t for t in times[mode]],
                "img_per_s": batch / median,
                "tflops": flops / median / 1e12,
                "setup_and_warmup_s": setup_s[mode],
                **checks.get(mode, {}),
                **loads[mode],
            }
        )
    rows += [{**head, "mode": mode, "library": mode.split()[0], "error": err} for mode, err in errors.items()]
    return rows


def summarise(rows: list[Row]) -> list[Row]:
    """Per (preset, batch, kind): each library's best mode and the ratio vit22b / timm."""
    out = []
    keys = sorted({(r["preset"], r["batch"], r["kind"]) for r in rows}, key=str)
    for key in keys:
        group = [r for r in rows if (r["preset"], r["batch"], r["kind"]) == key and "img_per_s" in r]
        best = {
            lib: max((r for r in group if r["library"] == lib), key=lambda r: r["img_per_s"], default=None)
            for lib in ("timm", "vit22b", "plain")
        }
        if best["timm"] and best["vit22b"]:
            row = {
                "preset": key[0],
                "batch": key[1],
                "kind": key[2],
                "timm_best": best["timm"]["mode"],
                "timm_img_per_s": best["timm"]["img_per_s"],
                "vit22b_best": best["vit22b"]["mode"],
                "vit22b_img_per_s": best["vit22b"]["img_per_s"],
                "ratio": best["vit22b"]["img_per_s"] / best["timm"]["img_per_s"],
            }
            if best["plain"]:  # the hand-written JAX ceiling, as a share of timm's best
                row.update(plain_best=best["plain"]["mode"], plain_img_per_s=best["plain"]["img_per_s"],
                           plain_ratio=best["plain"]["img_per_s"] / best["timm"]["img_per_s"])
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["S/16", "B/16"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--kinds", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--modes", nargs="+", default=[*TIMM_MODES, *OURS], choices=[*TIMM_MODES, *OURS, *PLAIN])
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per mode (the first compiles)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per mode, round-robin")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    ap.add_argument("--peak-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch's device")
    ap.add_argument("--out", default="bench/results/compare_timm_cpu.json")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = {
        **hardware(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        hardware_line(hw)
        + f", torch {torch.__version__} ({hw['torch_threads']} threads), timm {timm.__version__}",
        flush=True,
    )
    sizes = args.peak_sizes or default_peak_sizes()
    bf16 = any(mode.startswith("timm") and "bf16" in mode for mode in args.modes)
    peaks = {"jax": combine_peaks([measure_peak(sizes, 5)]), "torch": torch_peak(sizes, 5, bf16),
             "interleaved": interleaved_peaks(sizes, 5, bf16)}
    print(
        peak_line(peaks["jax"]["runs"][0]) + f"; torch f32 {peaks['torch']['torch_f32']:.3f}, "
        f"bf16 {peaks['torch'].get('torch_bf16', float('nan')):.3f}",
        flush=True,
    )
    out, rows = Path(args.out), []
    payload = {
        "command": command_line("bench/compare_timm.py", argv),
        "hardware": hw,
        "peaks": peaks,
        "rows": rows,
        "warmup": args.warmup,
        "steps": args.steps,
    }

    def best_peak() -> float:  # the round-robin peaks: both libraries under the same conditions
        return max(peaks["interleaved"]["best_tflops"].values())

    for spec in args.presets:
        for batch in args.batch_sizes:
            for kind in args.kinds:
                print(f"  {spec} batch {batch} {kind}", flush=True)
                new = bench_one(
                    spec,
                    args.image_size,
                    batch,
                    kind,
                    args.modes,
                    args.warmup,
                    args.steps,
                    check=batch == args.batch_sizes[0] and kind == args.kinds[0],
                )
                for r in new:
                    if "tflops" in r:
                        r["mfu_vs_best_peak"] = r["tflops"] / best_peak()
                        print(
                            f"    {r['mode']:34s} {r['step_ms_median']:9.1f} ms  {r['img_per_s']:7.2f} img/s"
                            f"  {r['tflops']:.3f} TFLOP/s",
                            flush=True,
                        )
                rows += new
                payload.update(
                    summary=summarise(rows), loadavg_at_end=loadavg(), best_peak_tflops=best_peak()
                )
                write_json(out, payload)  # after every group: an interrupted run keeps what it measured
                gc.collect()
                jax.clear_caches()
                torch._dynamo.reset()

    print(
        "\n"
        + markdown_table(
            ["preset", "batch", "kind", "mode", "step ms", "img/s", "TFLOP/s", "MFU vs best peak"],
            [
                [
                    r["preset"],
                    r["batch"],
                    r["kind"],
                    r["mode"],
                    f"{r['step_ms_median']:.1f}",
                    f"{r['img_per_s']:.2f}",
                    f"{r['tflops']:.3f}",
                    f"{100 * r['mfu_vs_best_peak']:.1f}%",
                ]
                for r in rows
                if "tflops" in r
            ],
        )
    )
    valid = peaks["interleaved"]["valid"] and all(r.get("valid", True) for r in rows)
    payload.update(valid=valid, loadavg_at_end=loadavg())
    write_json(out, payload)
    if refuse_if_invalid([*peaks["interleaved"]["loads"].values(), *(r for r in rows if "valid" in r)], out):
        return
    print(
        "\n"
        + markdown_table(
            ["preset", "batch", "kind", "timm best", "img/s", "vit22b best", "img/s", "vit22b / timm",
             "plain JAX best", "img/s", "plain / timm"],
            [
                [
                    s["preset"],
                    s["batch"],
                    s["kind"],
                    s["timm_best"],
                    f"{s['timm_img_per_s']:.2f}",
                    s["vit22b_best"],
                    f"{s['vit22b_img_per_s']:.2f}",
                    f"{s['ratio']:.2f}x",
                    s.get("plain_best", "-"),
                    f"{s['plain_img_per_s']:.2f}" if "plain_best" in s else "-",
                    f"{s['plain_ratio']:.2f}x" if "plain_best" in s else "-",
                ]
                for s in payload["summary"]
            ],
        )
    )
    print(
        f"\nbest matmul peak on this machine: {best_peak():.3f} TFLOP/s "
        f"(jax bf16->f32 {peaks['jax']['peak_tflops']:.3f}, "
        f"torch bf16 {peaks['torch'].get('torch_bf16', float('nan')):.3f}); "
        f"JSON: {out}"
    )


if __name__ == "__main__":
    main()
