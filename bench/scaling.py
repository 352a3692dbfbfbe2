"""Scaling curves (resolution, width), compile time per preset, and a training run's peak memory.

    python bench/scaling.py --out bench/results/scaling_cpu.json      # + scaling_cpu.png beside it

1. Resolution: S/14 at 224..448 px (256..1024 tokens), the trainer's step at a fixed batch: step
   time, MFU (analytic FLOPs incl. attention's quadratic term) and XLA's memory footprint of the
   step executable (arguments + outputs + temporaries - aliased: params, optimizer, activations).
2. Width: Ti, S, M, B (depth 12) at 224 px, the same measurements.
3. Compile time of the training step for every preset from the CPU toy to 22B (shapes only,
   nothing allocated: `init_state(abstract=True)`), with layers under `lax.scan` (the default) and
   for the small presets also unrolled (`scan=False`): scan keeps compile time flat in depth.
4. Peak host memory (max RSS) of a real `vit22b train` run on digits, measured in a child process.

Within each sweep the configurations are timed round-robin, so load on the machine hits all alike.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
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
from vit22b.train import TrainConfig, make_train_step
from vit22b.train_state import init_state

COMPILE_PRESETS = ["mu/16", "Ti/16", "S/16", "B/16", "L/14", "H/14", "g/14", "G/14", "e/14", "22B/14"]


def sweep(cfgs: dict[str, ModelConfig], batch: int, steps: int, peak: float) -> list[dict[str, Any]]:
    runners, infos = {}, {}
    for label, cfg in cfgs.items():
        runners[label], infos[label] = train_step_runner(cfg, batch)
        runners[label]()  # warm-up
        print(f"    {label}: compiled in {infos[label]['compile_s']:.1f} s", flush=True)
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, steps, loads=loads)
    del runners
    gc.collect()
    rows = []
    for label, cfg in cfgs.items():
        med = statistics.median(times[label])
        tflops = flops_per_image(cfg)["train"] * batch / med / 1e12
        rows.append(
            {
                "label": label,
                "width": cfg.width,
                "image_size": cfg.image_size,
                "tokens": cfg.num_patches,
                "batch": batch,
                "step_ms_median": 1e3 * med,
                "step_ms_all": [1e3 * t for t in times[label]],
                "img_per_s": batch / med,
                "tflops": tflops,
                "mfu": tflops / peak,
                **loads[label],
                **infos[label],
            }
        )
    return rows


def compile_time(cfg: ModelConfig, batch: int) -> dict[str, Any]:
    """Seconds to lower + compile the train step from shapes alone, and XLA's footprint."""
    tcfg = TrainConfig(model=cfg, batch_size=batch, progress=False)
    t0 = time.perf_counter()
    graphdef, tx, state, _ = init_state(tcfg, abstract=True)
    data = {
        "image": jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, cfg.in_channels), np.float32),
        "label": jax.ShapeDtypeStruct((batch,), np.int32),
    }
    lowered = make_train_step(graphdef, tx, tcfg).lower(state, data)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
    return {
        "params": params,
        "depth": cfg.depth,
        "scan": cfg.scan,
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def digits_run_peak_rss(steps: int) -> dict[str, Any]:
    """max RSS of `vit22b train --steps N` on digits, in a fresh child process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "vit22b.cli",
            "train",
            "--steps",
            str(steps),
            "--no-progress",
            "--workdir",
            str(Path(tmp) / "run"),
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        return {"command": " ".join(cmd[1:]), "error": proc.stderr[-500:]}
    # ru_maxrss of children is the max over all children so far: only valid if this one is larger
    return {
        "command": f"vit22b train --steps {steps}",
        "peak_rss_mib": rss_kib / 1024,
        "wall_s": wall,
        "valid": rss_kib > before,
    }


def plot(
    res_rows: list[dict[str, Any]],
    width_rows: list[dict[str, Any]],
    compile_rows: list[dict[str, Any]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for row_axes, rows, key, xlabel in (
        (axes[0], res_rows, "tokens", "tokens per image (S/14, 224..448 px)"),
        (axes[1], width_rows, "width", "width (Ti, S, M, B; depth 12, 224 px)"),
    ):
        x = [r[key] for r in rows]
        for ax, (y, ylabel) in zip(
            row_axes,
            (
                (lambda r: r["step_ms_median"], "train step ms"),
                (lambda r: r.get("total_bytes", 0) / 2**20, "step memory MiB (XLA)"),
                (lambda r: 100 * r["mfu"], "MFU %"),
            ),
            strict=True,
        ):
            ax.plot(x, [y(r) for r in rows], "o-")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    scanned = [r for r in compile_rows if r["scan"] and "compile_s" in r]
    unrolled = [r for r in compile_rows if not r["scan"] and "compile_s" in r]
    ax = axes[2][0]
    ax.plot([r["params"] for r in scanned], [r["compile_s"] for r in scanned], "o-", label="scan (default)")
    ax.plot([r["params"] for r in unrolled], [r["compile_s"] for r in unrolled], "s--", label="unrolled")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("train-step compile s")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2][1]
    ax.plot([r["depth"] for r in scanned], [r["compile_s"] for r in scanned], "o", label="scan")
    ax.plot([r["depth"] for r in unrolled], [r["compile_s"] for r in unrolled], "s", label="unrolled")
    ax.set_xlabel("depth")
    ax.set_ylabel("train-step compile s")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[2][2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution-preset", default="S/14")
    ap.add_argument("--resolutions", nargs="+", type=int, default=[224, 280, 336, 392, 448])
    ap.add_argument("--width-presets", nargs="+", default=["Ti/16", "S/16", "M/16", "B/16"])
    ap.add_argument("--width-image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile-presets", nargs="+", default=COMPILE_PRESETS)
    ap.add_argument(
        "--unrolled-max-params",
        type=float,
        default=2e8,
        help="also compile unrolled (scan=False) presets up to this size",
    )
    ap.add_argument("--digits-steps", type=int, default=300, help="0 skips the peak-RSS training run")
    ap.add_argument("--out", default="bench/results/scaling_cpu.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    hw = hardware()
    print(hardware_line(hw), flush=True)
    peak = combine_peaks([measure_peak(default_peak_sizes(), 5)])
    print(peak_line(peak["runs"][0]), flush=True)
    payload: dict[str, Any] = {"command": command_line("bench/scaling.py", argv), "hardware": hw}

    print(f"  resolution sweep, {args.resolution_preset} batch {args.batch}", flush=True)
    res_cfgs = {
        f"{args.resolution_preset} @ {s}": preset(args.resolution_preset, image_size=s)
        for s in args.resolutions
    }
    res_rows = sweep(res_cfgs, args.batch, args.steps, peak["peak_tflops"])
    print(f"  width sweep at {args.width_image_size} px, batch {args.batch}", flush=True)
    width_cfgs = {p: preset(p, image_size=args.width_image_size) for p in args.width_presets}
    width_rows = sweep(width_cfgs, args.batch, args.steps, peak["peak_tflops"])
    jax.clear_caches()

    print("  compile time per preset (shapes only)", flush=True)
    compile_rows = []
    for name in args.compile_presets:
        for scan in (True, False):
            cfg = preset(name, image_size=224, scan=scan)
            if not scan and cfg.width * cfg.width * cfg.depth * 12 > args.unrolled_max_params:
                continue
            try:
                row = {"preset": name, **compile_time(cfg, args.batch)}
            except Exception as e:
                row = {"preset": name, "scan": scan, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            compile_rows.append(row)
            print(f"    {name} scan={scan}: {row.get('compile_s', row.get('error'))}", flush=True)
            jax.clear_caches()
    rss = digits_run_peak_rss(args.digits_steps) if args.digits_steps else None
    peak = combine_peaks([*peak["runs"], measure_peak(default_peak_sizes(), 5)])
    for r in res_rows + width_rows:  # against the better of the two peak runs
        r["mfu"] = r["tflops"] / peak["peak_tflops"]
    payload.update(
        peak=peak,
        resolution=res_rows,
        width=width_rows,
        compile=compile_rows,
        digits_train_peak_rss=rss,
        loadavg_at_end=loadavg(),
        valid=all(r["valid"] for r in res_rows + width_rows),
    )
    write_json(out, payload)
    if refuse_if_invalid(res_rows + width_rows, out):
        return
    plot(res_rows, width_rows, compile_rows, out.with_suffix(".png"))

    def table(rows: list[dict[str, Any]]) -> str:
        return markdown_table(
            ["config", "tokens", "step ms", "img/s", "TFLOP/s", "MFU", "step memory MiB"],
            [
                [
                    r["label"],
                    r["tokens"],
                    f"{r['step_ms_median']:.0f}",
                    f"{r['img_per_s']:.2f}",
                    f"{r['tflops']:.3f}",
                    f"{100 * r['mfu']:.1f}%",
                    f"{r.get('total_bytes', 0) / 2**20:.0f}",
                ]
                for r in rows
            ],
        )

    print("\n" + table(res_rows) + "\n\n" + table(width_rows) + "\n")
    print(
        markdown_table(
            ["preset", "params", "depth", "layers", "trace+lower s", "compile s"],
            [
                [
                    r["preset"],
                    f"{r['params']:,}",
                    r["depth"],
                    "scan" if r["scan"] else "unrolled",
                    f"{r['trace_lower_s']:.1f}",
                    f"{r['compile_s']:.1f}",
                ]
                for r in compile_rows
                if "compile_s" in r
            ],
        )
    )
    if rss:
        print(
            f"\npeak host memory of `{rss.get('command')}`: {rss.get('peak_rss_mib', float('nan')):.0f} MiB"
        )
    print(f"MFU against {peak['peak_tflops']:.3f} TFLOP/s; JSON: {out}, plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
