"""Where a training step's time goes: the JAX profiler's per-op timeline, summed by kind.

    python bench/profile_step.py --preset S/16:224 --batch 8 --out bench/results/profile_s16_cpu.json

The trainer's step runs under `jax.profiler.trace(create_perfetto_trace=True)`; every XLA op that
ran (a "thunk": `ynn_fusion.12`, `dot_general.3`, `multiply_add_fusion.7`, `copy.4`, ...) is a
complete event in the Perfetto JSON. They are summed per op and per kind:
  matmul       dots and the library fusions that hold them (YNNPACK/XNNPACK/oneDNN), convolutions
  elementwise  XLA's own loop fusions (norms, GELU, softmax, optimizer update, casts)
  layout       copies and transposes (what a better layout would remove)
  reduction    reduce / reduce-window fusions
  other        everything else (collectives, custom calls, ...)
The matmul share, and the matmul rate it implies (analytic FLOPs / matmul time), say how far the
step is from being bound by its matmuls. The trace directory is kept (`--trace-dir`) for
TensorBoard's profile plugin or ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from common import command_line, hardware, hardware_line, markdown_table, train_step_runner, write_json
from vit22b.config import preset
from vit22b.flops import flops_per_image

HLO_OP = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")  # XLA op names; runtime events are CamelCase or "$file"


def kind_of(op: str) -> str:
    base = op.split(".")[0]
    if any(k in base for k in ("ynn", "xnn", "onednn", "dot", "convolution", "gemm")):
        return "matmul"
    if base.startswith(("copy", "transpose")) or base.endswith(("transpose_fusion", "copy_fusion")):
        return "layout"
    if "reduce" in base:
        return "reduction"
    if "fusion" in base or base in ("add", "multiply", "convert", "wrapped_convert", "exponential"):
        return "elementwise"
    return "other"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S/16:224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default=None, help="override the config's remat policy")
    ap.add_argument("--model", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="ModelConfig overrides, e.g. width=128 in_channels=1 (a Python literal or a string)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/profile_step_cpu.json")
    args = ap.parse_args(argv)
    name, _, image = args.preset.partition(":")
    overrides: dict[str, Any] = {"dtype_mm": args.dtype, **({"image_size": int(image)} if image else {})}
    if args.remat:
        overrides["remat"] = args.remat
    for item in args.model:
        field, _, value = item.partition("=")
        try:
            overrides[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[field] = value
    cfg = preset(name, **overrides)
    hw = hardware()
    print(hardware_line(hw), flush=True)
    run, info = train_step_runner(cfg, args.batch)
    run()
    run()
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="vit22b_trace_"))
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.steps):
            run()
    wall = (time.perf_counter() - t0) / args.steps
    trace_file = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = collections.defaultdict(float)
    steps_us = []
    for e in events:
        if e.get("ph") != "X":
            continue
        if HLO_OP.match(e["name"]):
            per_op[e["name"]] += e.get("dur", 0.0) / args.steps
        elif e["name"].startswith("PjitFunction"):
            steps_us.append(e.get("dur", 0.0))
    per_kind: dict[str, float] = collections.defaultdict(float)
    for op, us in per_op.items():
        per_kind[kind_of(op)] += us
    op_total = sum(per_kind.values())
    step_us = statistics.median(steps_us) if steps_us else 1e6 * wall
    flops = flops_per_image(cfg)["train"] * args.batch
    matmul_s = per_kind.get("matmul", 0.0) / 1e6
    # ops run on 2+ threads at once, so their summed time can exceed the wall time of the step
    result = {
        "command": command_line("bench/profile_step.py", argv),
        "hardware": hw,
        "preset": args.preset,
        "model_overrides": args.model,
        "batch": args.batch,
        "dtype_mm": args.dtype,
        "remat": cfg.remat,
        "step_ms_wall": 1e3 * wall,
        "step_ms_traced": step_us / 1e3,
        "op_ms_total": op_total / 1e3,
        "per_kind_ms": {k: v / 1e3 for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "per_kind_share": {k: v / op_total for k, v in per_kind.items()},
        "matmul_tflops_while_in_matmuls": flops / matmul_s / 1e12 if matmul_s else None,
        "step_tflops": flops / wall / 1e12,
        "top_ops_ms": {k: v / 1e3 for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]},
        "trace_dir": str(trace_dir),
        **info,
    }
    write_json(Path(args.out), result)
    print(
        f"\n{args.preset} batch {args.batch} {args.dtype} remat={cfg.remat}: step {1e3 * wall:.0f} ms wall, "
        f"ops {op_total / 1e3:.0f} ms summed over threads"
    )
    print(
        markdown_table(
            ["kind", "ms per step", "share of op time"],
            [
                [k, f"{v:.1f}", f"{100 * result['per_kind_share'][k]:.1f}%"]
                for k, v in result["per_kind_ms"].items()
            ],
        )
    )
    print(
        "\n"
        + markdown_table(
            ["op", "ms per step", "kind"],
            [[k, f"{v:.1f}", kind_of(k)] for k, v in result["top_ops_ms"].items()],
        )
    )
    if result["matmul_tflops_while_in_matmuls"]:
        print(
            f"\nanalytic FLOPs / matmul time = {result['matmul_tflops_while_in_matmuls']:.3f} TFLOP/s "
            f"(the step as a whole: {result['step_tflops']:.3f}); trace: {trace_dir}; JSON: {args.out}"
        )


if __name__ == "__main__":
    main()
