"""Input-pipeline throughput, and how long the training step waits for its batch.

    python bench/input_pipeline.py --images 2000 --workers 0 1 2 --out bench/results/input_pipeline_cpu.json

Part 1, the pipeline alone (decode + augment + batch, no model): img/s of `train_batches` for
  - generated 224-px JPEGs (photo-like: smooth colour fields plus noise, ~20-30 KB each) read from a
    class folder and from `vit22b prepare-data` ArrayRecord shards, against the worker count;
  - Fashion-MNIST in memory (if the Debian package is installed).
  Each figure is the median over `--repeats` timed windows of `--batches` batches after the workers'
  start-up (which is timed separately: it is paid once per run).
Part 2, the trainer itself: `train()` on the ArrayRecord shards with the default worker count, for
  S/16 at 224 px and nano/4 at 224 px, reporting the step's own img/s and `train/data_wait_ms` from
  metrics.jsonl: the share of step time spent waiting for data (target: under 5% for S/16).
The load average is recorded before and after each part; a part whose load exceeded the core
count is marked invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import command_line, hardware, hardware_line, loadavg, markdown_table, write_json


def make_jpegs(root: Path, n: int, size: int = 224, classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6.28, 3)
        field = np.stack([np.sin(6 * xx + phase[k] + c) * np.cos(4 * yy + phase[k]) for k in range(3)], -1)
        pixels = np.clip(127 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.jpg", quality=90)
    return root


def pipeline_rate(dataset: Any, batch: int, workers: int, batches: int, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    it = dataset.train_batches(batch, seed=0, workers=workers)
    next(it)
    startup = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batch * batches / (time.perf_counter() - t))
    it.close()
    return {"images_per_second": statistics.median(rates), "all": rates, "startup_s": startup}


def valid(before: tuple[float, ...] | None, after: tuple[float, ...] | None) -> bool:
    cores = os.cpu_count() or 1
    return not any(load is not None and load[0] > cores for load in (before, after))


def trainer_wait(data_dir: Path, spec: str, batch: int, steps: int, workdir: Path) -> dict[str, Any]:
    from vit22b.config import preset
    from vit22b.data import default_workers, load_dataset
    from vit22b.train import TrainConfig, train

    name, _, size = spec.partition(":")
    dataset = load_dataset(str(data_dir), int(size))
    cfg = TrainConfig(model=preset(name, image_size=int(size), num_classes=dataset.num_classes),
                      workdir=str(workdir), data=str(data_dir), batch_size=batch, steps=steps,
                      log_every=max(1, steps // 4), checkpoint_every=10**9, progress=False)
    before = loadavg()
    train(cfg, dataset)
    after = loadavg()
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/data_wait_ms" in r][1:]  # the first window holds compile
    img_s = statistics.median(r["train/images_per_second"] for r in windows)
    wait_ms = statistics.median(r["train/data_wait_ms"] for r in windows)
    step_ms = 1000 * batch / img_s
    return {"model": spec, "batch": batch, "steps": steps, "workers": default_workers(),
            "step_images_per_second": img_s, "data_wait_ms": wait_ms, "step_ms": step_ms,
            "wait_share": wait_ms / step_ms, "load_before": before, "load_after": after,
            "valid": valid(before, after)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="generated 224-px JPEGs")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per timed window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", nargs="*", default=["S/16:224", "nano/16:224"],
                    help="models for part 2 (empty: skip)")
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--out", default="bench/results/input_pipeline_cpu.json")
    args = ap.parse_args(argv)

    from vit22b.data import load_dataset
    from vit22b.idx import FASHION_MNIST_DIR
    from vit22b.records import prepare

    hw = hardware()
    print(hardware_line(hw))
    rows, results = [], {"hardware": hw, "command": command_line("bench/input_pipeline.py", argv)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = make_jpegs(Path(tmp) / "jpegs", args.images)
        prepare(folder, Path(tmp) / "records")
        print(f"generated {args.images} JPEGs and their ArrayRecord shards in "
              f"{time.perf_counter() - t0:.0f} s")
        sources = {"folder (224-px JPEG)": load_dataset(str(folder), 224),
                   "ArrayRecord (224-px JPEG)": load_dataset(str(Path(tmp) / "records"), 224)}
        if FASHION_MNIST_DIR.is_dir():
            sources["Fashion-MNIST (in memory)"] = load_dataset("fashion-mnist", None)
        pipeline = []
        for label, dataset in sources.items():
            in_memory = dataset.train.images is not None
            for workers in [0] if in_memory else args.workers:
                before = loadavg()
                r = pipeline_rate(dataset, args.batch, workers, args.batches, args.repeats)
                r.update(source=label, workers=workers, load_before=before, load_after=loadavg())
                r["valid"] = valid(r["load_before"], r["load_after"])
                pipeline.append(r)
                rows.append([label, workers if not in_memory else "-", f"{r['images_per_second']:.0f}",
                             f"{r['startup_s']:.1f}", f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}",
                             "yes" if r["valid"] else "NO (load > cores)"])
                print(rows[-1], flush=True)
        results["pipeline"] = pipeline
        print(markdown_table(["source", "workers", "img/s", "start-up s", "load before / after", "valid"],
                             rows))
        trainer = []
        for spec in args.train:
            r = trainer_wait(Path(tmp) / "records", spec, args.batch, args.train_steps,
                             Path(tmp) / f"run-{len(trainer)}")
            trainer.append(r)
            print(r, flush=True)
        results["trainer"] = trainer
    if trainer:
        print(markdown_table(
            ["model", "batch", "workers", "step img/s", "step ms", "data wait ms", "wait share", "valid"],
            [[r["model"], r["batch"], r["workers"], f"{r['step_images_per_second']:.1f}",
              f"{r['step_ms']:.0f}", f"{r['data_wait_ms']:.1f}", f"{100 * r['wait_share']:.1f}%",
              "yes" if r["valid"] else "NO"]
             for r in trainer]))
    write_json(Path(args.out), results)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
