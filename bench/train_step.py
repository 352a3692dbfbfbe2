"""Full training-step throughput, and MFU against the peak matmul rate measured in the same run.

    python bench/train_step.py --presets nano/4:16 S/16:224 --batch-sizes 8 32 \
        --dtypes bfloat16 float32 --steps 10 --warmup 2 --out bench/results/train_step_cpu.json

Each (preset[:image_size], batch, dtype_mm) runs the trainer's step as `train()` builds and calls
it (`init_state` + `make_train_step` on `--mesh`, default optimiser, state donated, a host numpy
batch fed each step). Step time: median (and min/max) of per-step `block_until_ready` wall times
after the warm-up steps. TFLOP/s: analytic `flops_per_image(cfg)["train"]` (3x forward; remat
recompute not counted) x batch / step time. MFU = TFLOP/s / (devices x peak); the peak is the best
median rate of large square jitted matmuls on one device, bf16 inputs with f32 accumulation (the
model's matmul form), measured on the same backend before and after the configs (the higher run
counts: on a shared machine the lower one mostly measures the neighbours). f32 and bf16-output
matmul rates are reported beside it for reference.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from common import Row, combine_peaks, hardware, loadavg, measure_peak, peak_line
from vit22b.config import ConfigError, ModelConfig, preset
from vit22b.flops import flops_per_image
from vit22b.optim import OptimConfig
from vit22b.sharding import check_divisibility, make_mesh
from vit22b.train import TrainConfig, make_train_step, to_global
from vit22b.train_state import init_state


def model_config(spec: str, dtype: str, remat: str = "nothing_saveable", attention: str = "auto"
                 ) -> ModelConfig:
    """'S/16:224' -> preset S/16 at image size 224 (without ':SIZE', the config's default)."""
    name, _, image = spec.partition(":")
    return preset(name, dtype_mm=dtype, remat=remat, attention=attention,
                  **({"image_size": int(image)} if image else {}))


def bench_config(
    spec: str,
    batch: int,
    dtype: str,
    steps: int,
    warmup: int,
    mesh_spec: str,
    remat: str = "nothing_saveable",
    attention: str = "auto",
) -> Row:
    model = model_config(spec, dtype, remat, attention)
    cfg = TrainConfig(
        model=model,
        optim=OptimConfig(),
        steps=warmup + steps,
        batch_size=batch,
        mesh=mesh_spec,
        progress=False,
    )
    mesh = make_mesh(cfg.mesh)
    check_divisibility(cfg.model, cfg.batch_size, mesh)
    graphdef, tx, state, shardings = init_state(cfg, mesh)
    train_step = make_train_step(graphdef, tx, cfg, shardings, mesh)
    rng = np.random.default_rng(0)
    shape = (batch, model.image_size, model.image_size, model.in_channels)
    host_batch = {
        "image": rng.standard_normal(shape, dtype=np.float32),
        "label": rng.integers(0, max(model.num_classes, 1), (batch,), dtype=np.int32),
    }

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # lower + compile; fills the jit cache that the calls below hit
        train_step.jitted.lower(state, to_global(host_batch, mesh)).compile()
    compile_s = time.perf_counter() - t0

    times, metrics = [], {}
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = train_step(state, host_batch)  # the old state is donated
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    first_call_s, times = times[0], times[warmup:]
    median, flops = statistics.median(times), flops_per_image(model)["train"]
    row = {
        "preset": spec.partition(":")[0],
        "image_size": model.image_size,
        "batch": batch,
        "dtype_mm": dtype,
        "remat": remat,
        "attention": attention,
        "num_patches": model.num_patches,
        "devices": mesh.size,
        "params": sum(x.size for x in jax.tree.leaves(state["params"])),
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "step_ms_all": [1e3 * t for t in times],
        "img_per_s": batch / median,
        "tokens_per_s": batch / median * model.num_patches,
        "train_flops_per_image": flops,
        "tflops": flops * batch / median / 1e12,
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "final_loss": float(metrics["loss"]),
        "finite": bool(metrics["finite"]),
    }
    del state, metrics
    return row


def add_mfu(rows: list[Row], peak: dict[str, Any], spec_peak: float | None = None) -> None:
    for r in rows:
        if "tflops" in r and spec_peak:
            r["mfu_vs_spec_peak"] = r["tflops"] / (r["devices"] * spec_peak)
        if "tflops" in r:
            r["mfu"] = r["tflops"] / (r["devices"] * peak["peak_tflops"])  # peak is per device
            r["mfu_vs_f32_peak"] = r["tflops"] / (r["devices"] * peak["best_tflops"]["f32"])


def format_table(rows: list[Row]) -> str:
    def cells(r: Row) -> list[str]:
        head = [r["preset"], str(r["image_size"]), str(r["batch"]), r["dtype_mm"], r.get("remat", ""),
                r.get("attention", "auto")]
        if "error" in r:
            return [*head, "error: " + r["error"][:60], *[""] * 8]
        ms = (f"{r[k]:.1f}" for k in ("step_ms_median", "step_ms_min", "step_ms_max", "img_per_s"))
        return [
            *head,
            *ms,
            f"{r['tokens_per_s']:.0f}",
            f"{r['tflops']:.3f}",
            f"{100 * r['mfu']:.1f}",
            f"{100 * r['mfu_vs_spec_peak']:.1f}" if "mfu_vs_spec_peak" in r else "-",
            f"{r['compile_s']:.1f}",
        ]

    lines = [
        [
            "preset",
            "image",
            "batch",
            "dtype",
            "remat",
            "attention",
            "step ms",
            "min",
            "max",
            "img/s",
            "tokens/s",
            "TFLOP/s",
            "MFU %",
            "MFU % vs spec",
            "compile s",
        ],
        *map(cells, rows),
    ]
    widths = [max(len(ln[i]) for ln in lines) for i in range(len(lines[0]))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)) + " |" for ln in lines]
    return "\n".join([text[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *text[1:]])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["nano/4:16", "S/16:224"],
        help="PRESET[:IMAGE_SIZE], e.g. S/16:224 (the image size defaults to 224)",
    )
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="global batch sizes")
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["bfloat16", "float32"],
        choices=["bfloat16", "float32", "float16"],
        help="the model's dtype_mm",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument(
        "--remats",
        nargs="+",
        default=["nothing_saveable"],
        help="remat policies to try (a jax.checkpoint_policies name, or none)",
    )
    ap.add_argument("--attentions", nargs="+", default=["auto"],
                    help="attention implementations to try (ModelConfig.attention)")
    ap.add_argument(
        "--spec-peak-tflops",
        type=float,
        default=None,
        help="the chip's datasheet dense bf16 peak per device (H200: 989): MFU against it too",
    )
    ap.add_argument("--mesh", default="-1x1", help="DATAxMODEL over all devices, as `vit22b train`")
    ap.add_argument(
        "--peak-sizes",
        nargs="+",
        type=int,
        default=None,
        help="square matmul sizes (default: 1024 2048 4096 on CPU, 4096 8192 16384 else)",
    )
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--out", help="JSON path (default bench/results/train_step_<platform>.json)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    try:  # a typo fails now, not after the peak measurement
        images = {spec: model_config(spec, "float32").image_size for spec in args.presets}
    except (ConfigError, ValueError) as e:
        ap.error(str(e))

    hw = hardware()
    out = Path(args.out or f"bench/results/train_step_{hw['platform']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/train_step.py", *argv])])
    print(
        f"{hw['device_kind']} x{hw['device_count']} ({hw['platform']}; {hw['cpu_count']} CPUs, "
        f"{hw['cpu_model']}), jax {hw['jax']}, load {hw['loadavg_at_start']}",
        flush=True,
    )
    sizes = args.peak_sizes or ([1024, 2048, 4096] if hw["platform"] == "cpu" else [4096, 8192, 16384])
    peak_runs = [measure_peak(sizes, args.peak_repeats)]
    print(peak_line(peak_runs[0]), flush=True)
    peak = combine_peaks(peak_runs)
    rows: list[Row] = []

    def save() -> None:  # after every row as well: an interrupted run keeps what it measured
        add_mfu(rows, peak, args.spec_peak_tflops)
        out.write_text(
            json.dumps(
                {
                    "command": command,
                    "hardware": hw,
                    "peak": peak,
                    "rows": rows,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "loadavg_at_end": loadavg(),
                },
                indent=2,
            )
        )

    for spec, batch, dtype, remat, attention in itertools.product(
        args.presets, args.batch_sizes, args.dtypes, args.remats, args.attentions
    ):
        print(f"  {spec} batch {batch} {dtype} remat {remat} attention {attention} ...", end=" ", flush=True)
        try:
            row = bench_config(spec, batch, dtype, args.steps, args.warmup, args.mesh, remat, attention)
            print(f"{row['step_ms_median']:.1f} ms, {row['tflops']:.3f} TFLOP/s", flush=True)
        except Exception as e:  # e.g. out of memory: record it and go on
            row = {
                "preset": spec.partition(":")[0],
                "image_size": images[spec],
                "batch": batch,
                "dtype_mm": dtype,
                "remat": remat,
                "attention": attention,
                "error": f"{type(e).__name__}: {e}",
            }
            print(row["error"][:200], flush=True)
        gc.collect()
        jax.clear_caches()  # drop this config's executables before the next
        rows.append(row)
        save()

    peak_runs.append(measure_peak(sizes, args.peak_repeats))
    peak = combine_peaks(peak_runs)
    save()
    print("\n" + format_table(rows))
    for when, run in zip(("start", "end"), peak_runs, strict=True):
        print(f"{when}: {peak_line(run)}")
    print(f"MFU = TFLOP/s / (devices x {peak['peak_tflops']:.3f} best bf16-in f32-acc matmul); JSON: {out}")


if __name__ == "__main__":
    main()
