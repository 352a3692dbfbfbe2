"""Remat policy and layer unrolling, side by side: the trainer's step for each combination.

    python bench/execution_policies.py --out bench/results/execution_policies_cpu.json

Issue 14 asked which of unrolling (`scan=False`) and remat (`remat=...`) pays per platform and
size. Every combination below is the trainer's own step (`common.train_step_runner`), timed
round-robin with the load recorded around each; XLA's memory footprint of each step executable
is beside it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import (
    command_line,
    hardware,
    hardware_line,
    loadavg,
    markdown_table,
    refuse_if_invalid,
    time_interleaved,
    train_step_runner,
    write_json,
)
from vit22b.config import preset

POLICIES: dict[str, dict[str, Any]] = {
    "scan, auto (default: dots_saveable on CPU)": {},
    "scan, nothing_saveable": {"remat": "nothing_saveable"},
    "scan, dots_saveable": {"remat": "dots_saveable"},
    "scan, none": {"remat": "none"},
    "unrolled, nothing_saveable": {"scan": False, "remat": "nothing_saveable"},
    "unrolled, dots_saveable": {"scan": False, "remat": "dots_saveable"},
    "unrolled, none": {"scan": False, "remat": "none"},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S/16:224", help="PRESET[:IMAGE_SIZE]")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per policy, round-robin")
    ap.add_argument("--out", default="bench/results/execution_policies_cpu.json")
    args = ap.parse_args(argv)
    name, _, image = args.preset.partition(":")
    sized = {"image_size": int(image)} if image else {}
    base = preset(name, num_classes=1000, dtype_mm=args.dtype, **sized)
    hw = hardware()
    print(hardware_line(hw), flush=True)
    runners, infos = {}, {}
    for label, changes in POLICIES.items():
        runners[label], infos[label] = train_step_runner(base.replace(**changes), args.batch)
        runners[label]()  # warm-up
        print(f"  {label}: compiled in {infos[label]['compile_s']:.1f} s", flush=True)
    loads: dict[str, Any] = {}
    times = time_interleaved(runners, args.steps, loads=loads)
    ref = statistics.median(times[next(iter(POLICIES))])
    medians = {label: statistics.median(times[label]) for label in POLICIES}
    rows = [{"policy": label, "changes": POLICIES[label], "step_ms_median": 1e3 * medians[label],
             "step_ms_all": [1e3 * t for t in times[label]], "time_vs_default": medians[label] / ref,
             **loads[label], **infos[label]} for label in POLICIES]
    out = Path(args.out)
    write_json(out, {"command": command_line("bench/execution_policies.py", argv), "hardware": hw,
                     "preset": args.preset, "batch": args.batch, "dtype_mm": args.dtype, "rows": rows,
                     "loadavg_at_end": loadavg(), "valid": all(r["valid"] for r in rows)})
    if refuse_if_invalid(rows, out):
        return
    print("\n" + markdown_table(
        ["policy", "step ms", "vs default", "step memory MiB", "compile s"],
        [[r["policy"], f"{r['step_ms_median']:.0f}", f"{r['time_vs_default']:.2f}x",
          f"{r.get('total_bytes', 0) / 2**20:.0f}", f"{r['compile_s']:.1f}"] for r in rows]))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
