"""Fashion-MNIST with the one command, over seeds: test accuracy against wall time.

    python bench/fashion_mnist.py --seeds 0 1 2 --out bench/results/fashion_mnist_cpu.json

Each seed runs `vit22b train --data fashion-mnist --seed S` (the recipe in recipes.py; any extra
flags after `--` are passed on, e.g. `-- --steps 12000` for the long run) in its own work dir, with
evaluation on the 10,000 test images every `--eval-every` steps. A finished work dir (final.json
present) is reused. Reported per seed: final test accuracy, training seconds, and the
(seconds, accuracy) curve; over seeds: mean, min and max. The PNG plots test accuracy against
training wall time beside the data set's own benchmark figures. The load average is recorded
before and after each run: time figures from a run whose load exceeded the core count are
marked invalid (the accuracies stand: a run's batches and steps do not depend on the load).

Recipe search is not done here: it used `--holdout train` (6,000 of the 60,000 training images);
see README "Real data".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import loadavg, markdown_table, write_json

# The data set's own table (README of zalandoresearch/fashion-mnist, as shipped by Debian).
REFERENCE = {"human": 0.835, "MLP": 0.883, "2 conv + pooling": 0.916, "HOG + SVM": 0.926,
             "ResNet18": 0.949, "WRN-28-10": 0.959}


def cores_used() -> int:
    """`taskset -c 0 python bench/fashion_mnist.py ...` trains on one core: the figures say so."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_seed(seed: int, workdir: Path, eval_every: int, extra: list[str]) -> dict:
    final, loads = workdir / "final.json", workdir / "bench_load.json"
    if not final.exists():
        before = loadavg()
        cmd = [sys.executable, "-m", "vit22b.cli", "train", "--data", "fashion-mnist", "--seed", str(seed),
               "--workdir", str(workdir), "--eval-every", str(eval_every), "--no-progress", *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        loads.write_text(json.dumps({"load_before": before, "load_after": loadavg(),
                                     "cores_used": cores_used()}))
    # a reused run reports the load of the run itself, not of now (None where it was not recorded)
    recorded = json.loads(loads.read_text()) if loads.exists() else {}
    before, after = recorded.get("load_before"), recorded.get("load_after")
    result = json.loads(final.read_text())
    curve = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/accuracy" in record:
            curve.append((record.get("eval/train_seconds"), record["step"], record["eval/accuracy"]))
    cores = os.cpu_count() or 1
    # recorded by the run; a run from before that record: this process's (the same command reused)
    used = recorded.get("cores_used") or cores_used()
    return {"cores_used": used, "seed": seed, "workdir": str(workdir),
            "test_accuracy": result["eval_accuracy"],
            "seconds": result["seconds"], "steps": result["steps"], "curve": curve,
            "load_before": before, "load_after": after,
            "time_valid": None if before is None else not any(x[0] > cores for x in (before, after))}


def plot(runs: list[dict], path: Path, earlier: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        pts = [(s / 60, a) for s, _, a in r["curve"] if s is not None]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3, label=f"seed {r['seed']}")
    for i, r in enumerate((earlier or {}).get("runs", [])):
        pts = [(s / 60, a) for s, _, a in r["curve"] if s is not None]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color="lightgrey", ls=":", marker=".",
                label=f"{earlier['label']} (seeds)" if i == 0 else None)
    longest = max((s for r in runs for s, _, _ in r["curve"] if s is not None), default=0) / 60
    for minutes in (15, 120) if longest > 20 else (15,):  # the two budgets
        ax.axvline(minutes, color="black", lw=0.7)
        ax.text(minutes, 61, f" {minutes} min", fontsize=7)
    for name, acc in REFERENCE.items():
        ax.axhline(100 * acc, color="grey", lw=0.7, ls="--")
        ax.text(ax.get_xlim()[1], 100 * acc, f" {name}", va="center", fontsize=7, color="grey")
    used = sorted({r["cores_used"] for r in runs})
    cores = "/".join(map(str, used)) + (" CPU core" if used == [1] else " CPU cores")
    ax.set(xlabel=f"training wall time (minutes, {cores})", ylabel="test accuracy (%)",
           title="vit22b train --data fashion-mnist", ylim=(60, 100))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--workdirs", default="workdirs/bench-fashion-mnist")
    ap.add_argument("--out", default="bench/results/fashion_mnist_cpu.json")
    ap.add_argument("--compare", nargs=2, metavar=("JSON", "LABEL"),
                    default=["bench/results/fashion_mnist_cpu_v1.json", "previous recipe"],
                    help="an earlier result file whose curves the plot shows in grey")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runs = [run_seed(s, Path(args.workdirs) / f"seed{s}", args.eval_every, extra) for s in args.seeds]
    accs = [r["test_accuracy"] for r in runs]
    summary = {"mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
               "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "seconds_mean": statistics.mean(r["seconds"] for r in runs)}
    header = ["seed", "test accuracy", "training s", "steps", "cores", "load before / after", "time valid"]
    print(markdown_table(header,
                         [[r["seed"], f"{100 * r['test_accuracy']:.2f}%", f"{r['seconds']:.0f}", r["steps"],
                           r["cores_used"],
                           f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}" if r["load_before"]
                           else "not recorded", r["time_valid"]]
                          for r in runs]))
    print(f"mean {100 * summary['mean']:.2f}% "
          f"(min {100 * summary['min']:.2f}, max {100 * summary['max']:.2f})")
    out = Path(args.out)
    write_json(out, {"command": " ".join(["python", "bench/fashion_mnist.py", *argv]), "extra_flags": extra,
                     "runs": runs, "summary": summary, "reference": REFERENCE})
    earlier = Path(args.compare[0])
    plot(runs, out.with_suffix(".png"),
         {**json.loads(earlier.read_text()), "label": args.compare[1]} if earlier.exists() else None)
    print(f"JSON: {out}, plot: {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
