"""The paper in miniature: ViT-22B's design claims tested at 2-CPU-core scale on real data.

    python bench/paper_in_miniature.py            # Fashion-MNIST, under an hour on 2 cores
    python bench/paper_in_miniature.py --quick    # digits, a few minutes (what the tests run)

Each claim of Dehghani et al. (2023) is re-tested with the model switches vit22b already has
(`ModelConfig`: block, qk_norm, qkv_bias/norm_bias, head), by `vit22b.train.train` itself: every run
is a work dir under --workdirs with its `final.json`, so a rerun reuses the finished runs and
resumes an interrupted one. Models are chosen on a validation split carved out of the training
images (Fashion-MNIST: 6,000 of the 60,000; `holdout="train"`); the test split is never read.

Claims (verdicts and their rules in miniature_report.py):
 1. QK norm keeps training stable at high learning rates (the 8B divergence; Wortsman et al. 2023):
    final loss against learning rate over two decades, with and without, at several widths; the
    LR sensitivity; each layer's largest attention logit during training.
 2. The parallel block matches the sequential one in quality, at a lower step time.
 3. Omitting the QKV and LayerNorm biases costs no quality; its step-time effect.
 4. MAP head vs global average pooling vs a class token.
 5. A student distilled from a larger teacher beats the same student trained on labels.
 6. A linear probe of a larger model approaches fine-tuning of a smaller one (downstream: digits).
 7. Scaling: validation error against model size and compute, with a fitted power law.
 8. Pictures: the MAP head's attention over sample images; the attention-logit curves.

Step times are measured round-robin in one process (bench/common.py), with the load average.
Writes reports/paper_in_miniature[_quick]/README.md, results.json and the PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import command_line, hardware, load_valid, loadavg, time_interleaved, train_step_runner
from vit22b.data import ImageDataset, load_dataset
from vit22b.flops import flops_per_image
from vit22b.recipes import train_config_for
from vit22b.train import TrainingError, train


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything a full or a quick report runs: the data, the base model, the grids."""

    data: str  # upstream data set (its recipe in recipes.py: optimizer, schedule, loss)
    image_size: int
    base: dict[str, Any]  # ModelConfig fields of the base model (a small ViT-22B)
    steps: int
    batch: int
    lr: float
    seeds: tuple[int, ...]
    qk_widths: tuple[int, ...]  # claim 1: widths (depth, heads of the base)
    qk_lrs: tuple[float, ...]
    qk_steps: int
    sizes: tuple[tuple[int, int], ...]  # claim 7: (width, depth); heads = width // 16, mlp 4x
    teacher: dict[str, Any]  # claim 5/6: the larger model
    teacher_steps: int
    downstream: str  # claim 6
    transfer_steps: int
    timing_steps: int  # claims 2/3: round-robin timed steps per variant


FULL = Scale(
    data="fashion-mnist", image_size=28,
    base=dict(width=64, depth=4, mlp_dim=256, num_heads=4, patch_size=7, dtype_mm="float32",
              remat="nothing_saveable"),  # as the report was measured (the default is now "auto")
    steps=400, batch=128, lr=2e-3, seeds=(0, 1, 2),
    qk_widths=(32, 64), qk_lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), qk_steps=250,
    sizes=((16, 2), (32, 3), (64, 4), (96, 5)),
    teacher=dict(width=128, depth=6, mlp_dim=512, num_heads=8), teacher_steps=800,
    downstream="digits", transfer_steps=200, timing_steps=20)
QUICK = Scale(  # shares runs where it can: its QK sweep at the base LR and the teacher (= the
    # largest scaling size) are runs the other claims train anyway
    data="digits", image_size=8,
    base=dict(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=4, dtype_mm="float32",
              remat="nothing_saveable"),
    steps=40, batch=64, lr=3e-3, seeds=(0,),
    qk_widths=(32,), qk_lrs=(3e-3, 3e-1), qk_steps=40,
    sizes=((16, 1), (32, 2), (48, 2)),
    teacher=dict(width=48, depth=2, mlp_dim=192, num_heads=3), teacher_steps=40,
    downstream="digits:classes=0-4", transfer_steps=20, timing_steps=3)

# Claims 2-4: one switch of the paper's default each (ModelConfig fields).
ABLATIONS: dict[str, dict[str, Any]] = {
    "paper default": {},
    "no QK norm": {"qk_norm": False},
    "sequential block": {"block": "sequential"},
    "+ QKV and norm biases": {"qkv_bias": True, "norm_bias": True},
    "GAP head": {"head": "gap"},
    "class-token head": {"head": "token"},
}


class Runner:
    """Trains (or reuses) one work dir per run; the data set is loaded once."""

    def __init__(self, scale: Scale, root: Path):
        self.scale, self.root = scale, root
        holdout = {"holdout": "train", "val_fraction": 0.1} if scale.data != "digits" else {}
        self.holdout = holdout
        self.dataset = load_dataset(scale.data, scale.image_size, **holdout)

    def run(self, name: str, model: dict[str, Any], *, seed: int = 0, lr: float | None = None,
            steps: int | None = None, dataset: ImageDataset | None = None, **fields: Any) -> dict[str, Any]:
        """{"final": final.json or None, "diverged": message or None, "log": metrics rows, ...}."""
        workdir = self.root / name
        final, diverged = workdir / "final.json", workdir / "diverged.json"
        data = dataset or self.dataset
        cfg = train_config_for(
            data, self.scale.data if dataset is None else data.name, model={**self.scale.base, **model},
            optim={"learning_rate": lr or self.scale.lr}, steps=steps or self.scale.steps,
            batch_size=self.scale.batch, workdir=str(workdir), seed=seed, eval_every=0,
            checkpoint_every=max(50, (steps or self.scale.steps) // 2), log_every=10, progress=False,
            mesh="1x1", log_attention_logits=True, **self.holdout,
            # the report was measured with translations and flips (the recipe's augmentation then)
            **({"augment": "crop_flip"} | fields))
        if not final.exists() and not diverged.exists():
            t0, load0 = time.time(), loadavg()
            print(f"  run {name} ...", end=" ", flush=True)
            try:
                r = train(cfg, data)
                print(f"{100 * r['eval_accuracy']:.2f}% in {time.time() - t0:.0f} s", flush=True)
            except TrainingError as e:  # a diverged run is a result of claim 1, not a failure
                diverged.write_text(json.dumps({"message": str(e)}))
                print("diverged", flush=True)
            loads = {"load_before": load0, "load_after": loadavg()}
            (workdir / "bench_load.json").write_text(json.dumps(loads))
        log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        # None when the run's process was stopped between its final.json and this record
        load = workdir / "bench_load.json"
        return {"name": name, "final": json.loads(final.read_text()) if final.exists() else None,
                "diverged": json.loads(diverged.read_text())["message"] if diverged.exists() else None,
                "log": log, "config": cfg, "workdir": str(workdir),
                "load": json.loads(load.read_text()) if load.exists() else None}


def final_loss(run: dict[str, Any]) -> float | None:
    """Mean logged train loss over the last 10% of the steps; None if the run diverged."""
    if run["diverged"]:
        return None
    losses = [(r["step"], r["train/loss"]) for r in run["log"] if "train/loss" in r]
    last = max(s for s, _ in losses)
    return statistics.mean(v for s, v in losses if s > 0.9 * last)


def initial_loss(cfg: Any) -> float:
    """The loss of the model at initialisation (zero head kernel: its bias alone), the cap of a
    diverged run in the LR sensitivity."""
    import jax.numpy as jnp

    from vit22b.objectives import classification_loss

    c = cfg.model.num_classes
    logits = jnp.full((c, c), cfg.model.head_bias_init)
    return float(classification_loss(logits, jnp.arange(c), cfg.loss, cfg.label_smoothing))


def lr_sensitivity(losses: list[float | None], cap: float) -> float:
    """Wortsman et al. (2023): the mean over the LR grid of min(loss, cap) - the best loss."""
    capped = [cap if v is None or not math.isfinite(v) else min(v, cap) for v in losses]
    return statistics.mean(capped) - min(capped)


def accuracies(runs: list[dict[str, Any]]) -> list[float]:
    return [r["final"]["eval_accuracy"] for r in runs if r["final"]]


def claim_qk_norm(runner: Runner) -> dict[str, Any]:
    s = runner.scale
    out: dict[str, Any] = {"lrs": list(s.qk_lrs), "widths": {}}
    for width in s.qk_widths:
        per: dict[str, Any] = {}
        for qk in (True, False):
            runs = [runner.run(*qk_run(s, width, qk, lr), lr=lr, steps=s.qk_steps) for lr in s.qk_lrs]
            losses = [final_loss(r) for r in runs]
            cap = initial_loss(runs[0]["config"])
            per["qk_norm" if qk else "no_qk_norm"] = {
                "final_loss": losses, "diverged": [bool(r["diverged"]) for r in runs],
                "val_accuracy": [r["final"]["eval_accuracy"] if r["final"] else None for r in runs],
                "lr_sensitivity": lr_sensitivity(losses, cap), "loss_cap": cap,
                "attn_logit_max": [attention_curves(r) for r in runs]}
        out["widths"][str(width)] = per
    return out


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "plus")


def qk_run(s: Scale, width: int, qk: bool, lr: float) -> tuple[str, dict[str, Any]]:
    """(work dir name, model changes) of one point of the QK sweep; the point at the base model,
    LR and steps is the ablation's run (seed 0), trained once."""
    shape = dict(width=width, mlp_dim=4 * width, num_heads=max(2, width // 16))
    if shape == {k: s.base[k] for k in shape} and lr == s.lr and s.qk_steps == s.steps:
        name = "paper default" if qk else "no QK norm"
        return f"ablation/{slug(name)}_s0", ABLATIONS[name]
    return f"qk/w{width}_{'qk' if qk else 'noqk'}_lr{lr:g}", {**shape, "qk_norm": qk}


def attention_curves(run: dict[str, Any]) -> dict[str, list[float]]:
    """{"step": [...], "layer_i": [...]}: each layer's largest attention logit over training."""
    rows = [r for r in run["log"] if "train/attn_logit_max/0" in r]
    layers = sorted({k.rsplit("/", 1)[1] for r in rows for k in r if k.startswith("train/attn_logit_max/")},
                    key=int)
    return {"step": [r["step"] for r in rows],
            **{f"layer_{i}": [r[f"train/attn_logit_max/{i}"] for r in rows] for i in layers}}


def step_times(runner: Runner, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median seconds per training step of each variant, timed round-robin in this process."""
    from vit22b.config import ModelConfig

    s, d = runner.scale, runner.dataset
    shape = dict(image_size=s.image_size, in_channels=d.in_channels, num_classes=d.num_classes)
    runners = {name: train_step_runner(ModelConfig(**{**s.base, **shape, **v}), s.batch)[0]
               for name, v in variants.items()}
    for run in runners.values():
        run()  # warm-up
    loads: dict[str, dict[str, Any]] = {}
    times = time_interleaved(runners, s.timing_steps, loads=loads)
    return {name: {"median_s": statistics.median(t), "all_s": t, **loads[name]} for name, t in times.items()}


def claim_ablations(runner: Runner) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, changes in ABLATIONS.items():
        runs = [runner.run(f"ablation/{slug(name)}_s{seed}", changes, seed=seed)
                for seed in runner.scale.seeds]
        out[name] = {"changes": changes, "val_accuracy": accuracies(runs),
                     "final_loss": [final_loss(r) for r in runs],
                     "images_per_s_in_training": [statistics.median(
                         r["train/images_per_second"] for r in run["log"] if "train/images_per_second" in r)
                         for run in runs]}
    timed = step_times(runner, {k: v for k, v in ABLATIONS.items() if k in (
        "paper default", "sequential block", "+ QKV and norm biases")})
    for name, t in timed.items():
        out[name]["step_time"] = t
    return out


def claim_distillation(runner: Runner) -> dict[str, Any]:
    s = runner.scale
    teacher = runner.run("distill/teacher", s.teacher, steps=s.teacher_steps)
    out: dict[str, Any] = {"teacher_val_accuracy": teacher["final"]["eval_accuracy"],
                           "teacher": s.teacher, "teacher_steps": s.teacher_steps}
    for label, weight in (("distilled", 0.0), ("labels", None)):
        runs = []
        for seed in s.seeds:
            if weight is None:  # the same student on labels: the ablation's paper-default runs
                runs.append(runner.run(f"ablation/paper_default_s{seed}", {}, seed=seed))
            else:
                runs.append(runner.run(f"distill/student_s{seed}", {}, seed=seed, teacher=teacher["workdir"],
                                       distill_label_weight=weight, loss="softmax", label_smoothing=0.0,
                                       teacher_dtype="float32"))  # bf16 is emulated on many CPUs
        out[label] = {"val_accuracy": accuracies(runs)}
    return out


def claim_probe_vs_finetune(runner: Runner) -> dict[str, Any]:
    """Downstream: the larger model (the distillation teacher) probed, the base model probed and
    fine-tuned; all pretrained on the upstream data."""
    from vit22b.tasks import common
    from vit22b.tasks.finetune import finetune
    from vit22b.tasks.probe import accuracy, train_linear

    s = runner.scale
    large = runner.root / "distill" / "teacher"
    small = runner.root / "ablation" / "paper_default_s0"
    down = load_dataset(s.downstream, s.image_size)
    out: dict[str, Any] = {"downstream": s.downstream}
    for label, ckpt in (("large", large), ("small", small)):
        model = common.load_backbone(ckpt)
        fn = common.batch_fn(model, "pre_logits")
        x_tr, y_tr = common.run_batches(fn, down, "train", 256, False, "train")
        x_val, y_val = common.run_batches(fn, down, "val", 256, False, "val")
        (x_tr, x_val), _ = common.standardise(x_tr, x_val)
        w, b, _ = train_linear(x_tr, y_tr, down.num_classes)
        out[f"probe_{label}"] = accuracy(x_val, y_val, w, b)
    path = runner.root / "transfer" / "finetune_small"
    done = path / "finetune.json"
    if not done.exists():
        finetune(small, down, path, steps=s.transfer_steps, batch_size=64, progress=False, mesh="1x1",
                 eval_every=0, checkpoint_every=s.transfer_steps)
    out["finetune_small"] = json.loads(done.read_text())["val_accuracy"]
    from vit22b.weights import read_config

    out["params"] = {label: _params(read_config(p)) for label, p in (("large", large), ("small", small))}
    return out


def _params(cfg: Any) -> int:
    from vit22b.model import abstract_model, count_params, split_params

    return count_params(split_params(abstract_model(cfg))[1])


def claim_scaling(runner: Runner) -> dict[str, Any]:
    rows = []
    for width, depth in runner.scale.sizes:
        shape = dict(width=width, depth=depth, mlp_dim=4 * width, num_heads=max(2, width // 16))
        s = runner.scale
        if shape == {k: s.base[k] for k in shape}:
            run = runner.run("ablation/paper_default_s0", {})  # the base model: already trained
        elif shape == {k: s.teacher.get(k) for k in shape} and s.teacher_steps == s.steps:
            run = runner.run("distill/teacher", s.teacher, steps=s.teacher_steps)
        else:
            run = runner.run(f"scaling/w{width}_d{depth}", shape)
        cfg = run["config"]
        rows.append({"width": width, "depth": depth, "params": _params(cfg.model),
                     "train_flops": flops_per_image(cfg.model)["train"] * cfg.steps * cfg.batch_size,
                     "val_error": 1 - run["final"]["eval_accuracy"]})
    return {"rows": rows, "fit": power_law_fit([r["params"] for r in rows], [r["val_error"] for r in rows])}


def power_law_fit(sizes: list[float], errors: list[float]) -> dict[str, float]:
    """error = coefficient * size^exponent, least squares in log-log; R² of that line."""
    n, err = np.log(sizes), np.log(errors)
    slope, intercept = np.polyfit(n, err, 1)
    fitted = slope * n + intercept
    r2 = 1 - float(np.sum((err - fitted) ** 2) / max(np.sum((err - err.mean()) ** 2), 1e-12))
    return {"exponent": float(slope), "coefficient": float(math.exp(intercept)), "r2": r2}


def map_attention_samples(runner: Runner, count: int = 8) -> dict[str, Any]:
    """The base model's MAP attention (mean over heads) on the first `count` validation images."""
    from vit22b.tasks import common

    model = common.load_backbone(runner.root / "ablation" / "paper_default_s0")
    images = next(runner.dataset.eval_batches(count, split="val"))["image"][:count]
    _, out = model(images)
    weights = np.asarray(model.map_head.attention_weights(out["encoded"])).mean(axis=1)  # [B, N]
    grid = model.cfg.grid_size
    return {"images": ((np.asarray(images)[..., 0] + 1) * 127.5).astype(np.uint8).tolist(),
            "attention": weights.reshape(count, grid, grid).tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, tiny models: a few minutes")
    ap.add_argument("--workdirs", default=None, help="default workdirs/paper_in_miniature[_quick]")
    ap.add_argument("--out", default=None, help="default reports/paper_in_miniature[_quick]")
    args = ap.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    scale = QUICK if args.quick else FULL
    root = Path(args.workdirs or f"workdirs/paper_in_miniature{suffix}")
    out = Path(args.out or f"reports/paper_in_miniature{suffix}")
    t0, load0 = time.time(), loadavg()
    # Runs that differ only in seed compile the same programs: XLA's persistent cache skips the
    # recompiles (half of a small run's time on CPU is compiling).
    import jax

    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    runner = Runner(scale, root)
    results: dict[str, Any] = {"command": command_line("bench/paper_in_miniature.py", argv),
                               "hardware": hardware(), "scale": dataclasses.asdict(scale),
                               "load_before": load0}
    for key, claim in (("ablations", claim_ablations), ("qk_norm", claim_qk_norm),
                       ("distillation", claim_distillation), ("probe_vs_finetune", claim_probe_vs_finetune),
                       ("scaling", claim_scaling), ("map_attention", map_attention_samples)):
        print(f"claim: {key}", flush=True)
        results[key] = claim(runner)
    finals = [json.loads(f.read_text()) for f in root.rglob("final.json")]
    results.update(load_after=loadavg(), wall_s=time.time() - t0, runs=len(finals),
                   train_seconds=sum(f["seconds"] for f in finals),
                   timing_valid=load_valid(load0, loadavg()))
    from miniature_report import write_report

    write_report(results, out)
    print(f"report: {out / 'README.md'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
