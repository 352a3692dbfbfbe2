"""The attention implementations side by side: throughput against batch size, and MFU against
sequence length.

    python bench/attention_impl.py --out bench/results/attention_impl_cpu.json

1. Batch: S/16 at 224 px, inference (the forward pass) and the trainer's training step, at batch 8
   and 32, for each `--attentions` implementation (ModelConfig.attention). Issue 14's target: img/s
   at batch 32 >= img/s at batch 8.
2. Length: S/14 at 224 px (256 tokens) and 448 px (1,024 tokens), the training step at a fixed
   batch, MFU from the analytic FLOPs (attention's quadratic term included) against the matmul
   peak measured in the same run. Target: MFU at 448 px >= 85% of MFU at 224 px.

Within each part every (config, implementation) is timed round-robin with the load recorded
around each; a run whose load exceeded the core count prints no summary (`common.refuse_if_invalid`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import (
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
    train_step_runner,
    write_json,
)
from vit22b.config import ModelConfig, preset
from vit22b.flops import flops_per_image
from vit22b.model import apply, init_model, split_params


def infer_runner(cfg: ModelConfig, batch: int) -> Any:
    graphdef, params = split_params(init_model(cfg, 0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (batch, cfg.image_size, cfg.image_size, cfg.in_channels), np.float32))
    forward = jax.jit(lambda p, x: apply(graphdef, p, x)[0])
    forward(params, x).block_until_ready()  # compile
    return lambda: forward(params, x).block_until_ready()


def timed(configs: dict[str, tuple[str, ModelConfig, int]], steps: int) -> list[dict[str, Any]]:
    """configs: label -> (kind "infer"/"train", model, batch); one row per label, round-robin."""
    runners = {}
    for label, (kind, cfg, batch) in configs.items():
        if kind == "infer":
            runners[label] = infer_runner(cfg, batch)
        else:
            runners[label], _ = train_step_runner(cfg, batch)
            runners[label]()  # compile + one warm-up step
        print(f"    {label}: ready", flush=True)
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, steps, loads=loads)
    del runners
    gc.collect()
    rows = []
    for label, (kind, cfg, batch) in configs.items():
        med = statistics.median(times[label])
        flops = flops_per_image(cfg)["train" if kind == "train" else "forward"] * batch
        rows.append({"label": label, "kind": kind, "attention": cfg.attention, "image_size": cfg.image_size,
                     "tokens": cfg.num_patches, "batch": batch, "step_ms_median": 1e3 * med,
                     "step_ms_all": [1e3 * t for t in times[label]], "img_per_s": batch / med,
                     "tflops": flops / med / 1e12, **loads[label]})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attentions", nargs="+", default=["auto", "xla"],
                    help="ModelConfig.attention values (auto: heads_major below 1,024 keys on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-preset", default="S/16")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--length-preset", default="S/14")
    ap.add_argument("--resolutions", nargs="+", type=int, default=[224, 448])
    ap.add_argument("--length-attentions", nargs="+", default=["auto", "heads_major", "xla"])
    ap.add_argument("--length-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed calls per config, round-robin")
    ap.add_argument("--out", default="bench/results/attention_impl_cpu.json")
    args = ap.parse_args(argv)
    hw = hardware()
    print(hardware_line(hw), flush=True)
    peak = combine_peaks([measure_peak(default_peak_sizes(), 5)])
    print(peak_line(peak["runs"][0]), flush=True)

    def model(name: str, image: int, attention: str) -> ModelConfig:
        return preset(name, image_size=image, num_classes=1000, dtype_mm=args.dtype, attention=attention)

    print("  1. batch", flush=True)
    batch_rows = timed({f"{kind} b{b} {att}": (kind, model(args.batch_preset, 224, att), b)
                        for att in args.attentions for kind in ("infer", "train") for b in args.batch_sizes},
                       args.steps)
    jax.clear_caches()
    print("  2. length", flush=True)
    length = {f"{args.length_preset} @ {image} {att}": ("train", model(args.length_preset, image, att),
                                                         args.length_batch)
              for image in args.resolutions for att in args.length_attentions}
    length_rows = timed(length, args.steps)
    peak = combine_peaks([*peak["runs"], measure_peak(default_peak_sizes(), 5)])
    # the peak MFU divides by: the matmul form the model runs (f32, or bf16 in with f32 accumulation)
    divisor = peak["best_tflops"]["f32" if args.dtype == "float32" else "bf16_f32acc"]
    for r in length_rows + batch_rows:
        r["mfu"] = r["tflops"] / divisor
    first = min(args.resolutions)
    for r in length_rows:
        base = next(x for x in length_rows if x["image_size"] == first and x["attention"] == r["attention"])
        r["mfu_vs_smallest_image"] = r["mfu"] / base["mfu"]
    out = Path(args.out)
    rows = batch_rows + length_rows
    write_json(out, {"command": command_line("bench/attention_impl.py", argv), "hardware": hw, "peak": peak,
                     "mfu_divisor_tflops": divisor, "dtype_mm": args.dtype, "batch": batch_rows,
                     "length": length_rows, "loadavg_at_end": loadavg(),
                     "valid": all(r["valid"] for r in rows)})
    if refuse_if_invalid(rows, out):
        return
    print("\n" + markdown_table(
        ["kind", "attention", "batch", "step ms", "img/s", "MFU"],
        [[r["kind"], r["attention"], r["batch"], f"{r['step_ms_median']:.0f}", f"{r['img_per_s']:.2f}",
          f"{100 * r['mfu']:.1f}%"] for r in batch_rows]))
    print("\n" + markdown_table(
        ["image", "tokens", "attention", "step ms", "img/s", "MFU", f"MFU vs {first} px"],
        [[r["image_size"], r["tokens"], r["attention"], f"{r['step_ms_median']:.0f}", f"{r['img_per_s']:.2f}",
          f"{100 * r['mfu']:.1f}%", f"{100 * r['mfu_vs_smallest_image']:.0f}%"] for r in length_rows]))
    print(f"\nMFU against the measured {args.dtype} matmul peak {divisor:.3f} TFLOP/s; JSON: {out}")


if __name__ == "__main__":
    main()
