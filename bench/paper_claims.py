"""The paper's speed claims for its modifications, at small scale, side by side in one run.

    python bench/paper_claims.py --preset S/16:224 --batch 8 --out bench/results/paper_claims_cpu.json

ViT-22B (Dehghani et al., 2023, section 2) says: the parallel block with fused projections trains
faster than the sequential one (about 15% on TPU at large scale), removing the QKV/LayerNorm biases
gives about +3% utilisation "without any quality degradation", QK normalisation is cheap, and the
MAP head replaces the class token. Each variant below changes one switch of the paper's default
(`ModelConfig` fields, so this is exactly what `vit22b train --block sequential ...` trains); the
trainer's step is compiled for each and they are timed round-robin. MFU uses each variant's own
analytic FLOPs (biases and norms add none; the sequential block has the same matmuls) against the
bf16->f32 matmul peak measured in the same run. Memory: XLA's footprint of each step executable.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path
from typing import Any

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
from vit22b.config import preset
from vit22b.flops import flops_per_image

VARIANTS: dict[str, dict[str, Any]] = {
    "paper default": {},
    "sequential block": {"block": "sequential"},
    "+ QKV and norm biases": {"qkv_bias": True, "norm_bias": True},
    "no QK norm": {"qk_norm": False},
    "GAP head (no MAP)": {"head": "gap"},
    "plain ViT (all four)": {
        "block": "sequential",
        "qkv_bias": True,
        "norm_bias": True,
        "qk_norm": False,
        "head": "gap",
    },
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S/16:224", help="PRESET[:IMAGE_SIZE]")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant, round-robin")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="bench/results/paper_claims_cpu.json")
    args = ap.parse_args(argv)
    name, _, image = args.preset.partition(":")
    base = preset(name, dtype_mm=args.dtype, **({"image_size": int(image)} if image else {}))
    hw = hardware()
    print(hardware_line(hw), flush=True)
    peak = combine_peaks([measure_peak(default_peak_sizes(), 5)])
    print(peak_line(peak["runs"][0]), flush=True)

    runners, infos, cfgs = {}, {}, {}
    for variant in args.variants:
        cfgs[variant] = base.replace(**VARIANTS[variant])
        runners[variant], infos[variant] = train_step_runner(cfgs[variant], args.batch)
        for _ in range(args.warmup):
            runners[variant]()
        print(f"  {variant}: compiled in {infos[variant]['compile_s']:.1f} s", flush=True)
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, args.steps, loads=loads)
    del runners
    gc.collect()
    peak = combine_peaks([*peak["runs"], measure_peak(default_peak_sizes(), 5)])

    rows, ref = [], statistics.median(times[args.variants[0]])
    for variant in args.variants:
        med = statistics.median(times[variant])
        tflops = flops_per_image(cfgs[variant])["train"] * args.batch / med / 1e12
        rows.append(
            {
                "variant": variant,
                "changes": VARIANTS[variant],
                "step_ms_median": 1e3 * med,
                "step_ms_all": [1e3 * t for t in times[variant]],
                "img_per_s": args.batch / med,
                "tflops": tflops,
                "mfu": tflops / peak["peak_tflops"],
                "time_vs_paper_default": med / ref,
                **loads[variant],
                **infos[variant],
            }
        )
    write_json(
        Path(args.out),
        {
            "command": command_line("bench/paper_claims.py", argv),
            "hardware": hw,
            "preset": args.preset,
            "batch": args.batch,
            "dtype_mm": args.dtype,
            "peak": peak,
            "rows": rows,
            "loadavg_at_end": loadavg(),
            "valid": all(r["valid"] for r in rows),
        },
    )
    if refuse_if_invalid(rows, args.out):
        return
    print(
        "\n"
        + markdown_table(
            [
                "variant",
                "step ms",
                "img/s",
                "TFLOP/s",
                "MFU",
                "step time vs paper",
                "params",
                "step memory MiB",
            ],
            [
                [
                    r["variant"],
                    f"{r['step_ms_median']:.1f}",
                    f"{r['img_per_s']:.2f}",
                    f"{r['tflops']:.3f}",
                    f"{100 * r['mfu']:.1f}%",
                    f"{r['time_vs_paper_default']:.3f}",
                    f"{r['params']:,}",
                    f"{r.get('total_bytes', 0) / 2**20:.0f}",
                ]
                for r in rows
            ],
        )
    )
    print(
        f"MFU against {peak['peak_tflops']:.3f} TFLOP/s (bf16->f32, best of 2 runs); JSON: {args.out}"
    )


if __name__ == "__main__":
    main()
