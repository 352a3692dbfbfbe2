"""Transfer across data sets: a backbone pretrained on Fashion-MNIST, evaluated on digits it never saw.

    python bench/transfer_shift.py --upstream workdirs/fashion-mnist --out bench/results/transfer_shift.json

The paper's protocol in miniature: upstream = `vit22b train --data fashion-mnist` (trained here first
when --upstream holds no model; about 15-25 minutes on 2 cores), downstream = scikit-learn's digits
(1,797 images, 8x8, upsampled to the upstream's 28 px; the fixed 20% held-out split), a data set
whose classes and images the backbone never saw. Every transfer command runs as a user would run it
(a child process each), and every figure stands beside the baselines that give it meaning:

- probe, few-shot: the same architecture with random weights, frozen (what pretraining adds);
  few-shot also against ridge on the raw 8x8 pixels (what any backbone adds);
- finetune (28 px, and 56 px with the posemb resampled): the same model from scratch, same budget;
- distill (teacher = the fine-tuned model): the same student trained on the labels alone
  (`--label-weight 1`), same budget;
- lit (image tower = the upstream backbone, locked; text tower trained on digit captions only):
  beside the linear probe on the same frozen features.

Prints a markdown table (upstream, downstream, task, measured, baselines, wall time), writes the JSON,
and a PNG of few-shot accuracy against shots. Every number is from this run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import command_line, hardware, loadavg, markdown_table, write_json
from transfer_suite import lit_cell, pct, robustness_cell

SHOTS = [1, 5, 10, 25]
L2_REGS = [1.0, 32.0, 1024.0]  # each row reports its best lambda (chosen on the eval split, for all)


def best_fewshot(r: dict[str, Any]) -> dict[str, float]:
    """{shots: best mean accuracy over the lambdas} from a fewshot JSON's accuracy table."""
    return {int(k.removesuffix("shot")): max(v["mean"] for v in by_lam.values())
            for k, by_lam in r["accuracy"].items()}


def fewshot_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}-shot {pct(a)}" for k, a in best_fewshot(r).items())


def top1(r: dict[str, Any]) -> str:
    return f"top-1 {pct(r['val_accuracy'])}"


def student(r: dict[str, Any]) -> str:
    return f"student {pct(r['student_val_accuracy'])} (teacher {pct(r['teacher_val_accuracy'])})"


PIXELS = "PIXELS"  # not a vit22b command: pixel_fewshot below


def rows(up: str, rnd: str, s: str) -> list[dict[str, Any]]:
    """Per task: runs = [(label, command, JSON it writes under the scratch dir s, headline)], the
    measured one first, then its baselines. A command shared by two rows runs once."""
    fs = "fewshot --data digits --shots 1 5 10 25 --l2-reg 1 32 1024 --no-progress"
    ft = "finetune --data digits --steps 300 --batch-size 64 --no-progress"
    st = "distill --teacher {s}/ft28 --data digits --student-preset nano/7 --steps 500 --no-progress"
    spec = [  # (task, what, (command, json, headline), [(baseline label, command, json, headline)])
        ("probe", "linear probe on frozen pre_logits",
         ("probe --checkpoint {up} --data digits --no-progress --out {s}/probe.json", "probe.json", top1),
         [("random-init backbone", "probe --checkpoint {rnd} --data digits --no-progress "
           "--out {s}/probe_random.json", "probe_random.json", top1)]),
        ("fewshot", "closed-form ridge on frozen pre_logits, 3 seeds",
         (fs + " --checkpoint {up} --out {s}/fewshot.json", "fewshot.json", fewshot_text),
         [("random-init backbone", fs + " --checkpoint {rnd} --out {s}/fewshot_random.json",
           "fewshot_random.json", fewshot_text),
          ("8x8 pixels + ridge", PIXELS, "fewshot_pixels.json", fewshot_text)]),
        ("finetune", "all weights, new zero head, 28 px, 300 steps",
         (ft + " --checkpoint {up} --workdir {s}/ft28", "ft28/finetune.json", top1),
         [("from scratch", ft + " --checkpoint {up} --from-scratch --workdir {s}/ft28_0",
           "ft28_0/finetune.json", top1)]),
        ("finetune", "at 56 px (posemb resampled 4x4 -> 8x8), 300 steps",
         (ft + " --checkpoint {up} --image-size 56 --workdir {s}/ft56", "ft56/finetune.json", top1),
         [("from scratch", ft + " --checkpoint {up} --image-size 56 --from-scratch --workdir {s}/ft56_0",
           "ft56_0/finetune.json", top1)]),
        ("distill", "fine-tuned 28 px model -> nano/7 student, KL",
         (st + " --workdir {s}/st", "st/distill.json", student),
         [("labels only, same student and budget", st + " --label-weight 1 --workdir {s}/st_labels",
           "st_labels/distill.json", lambda r: pct(r["student_val_accuracy"]))]),
        ("robustness", "the fine-tuned model; T fit on one half of val, ECE on the other",
         ("robustness --checkpoint {s}/ft28 --data digits --no-progress --out {s}/robustness.json",
          "robustness.json", robustness_cell), []),
        ("lit", "text tower on digit captions only, upstream backbone locked",
         ("lit --checkpoint {up} --data digits --workdir {s}/lit --no-progress", "lit/lit.json", lit_cell),
         [("linear probe on the same features", "probe --checkpoint {up} --data digits --no-progress "
           "--out {s}/probe.json", "probe.json", top1)]),
    ]
    q = {"up": shlex.quote(up), "rnd": shlex.quote(rnd), "s": shlex.quote(s)}
    return [{"task": task, "what": what,
             "runs": [(label, cmd.format(**q), js, extract)
                      for label, cmd, js, extract in [("measured", *main), *base]]}
            for task, what, main, base in spec]


def random_init_backbone(upstream: Path, out: Path) -> None:
    """The upstream's architecture with fresh random weights: what pretraining is measured against."""
    from vit22b.model import init_model, split_params
    from vit22b.weights import read_config, save_model

    cfg = read_config(upstream)  # the header only: the upstream's weights are not needed here
    _, params = split_params(init_model(cfg, seed=0))
    save_model(out, params, cfg)


def pixel_fewshot(path: Path) -> None:
    """Ridge few-shot on the raw 8x8 digits pixels (64-d), the same shots, seeds and lambdas."""
    from vit22b.data import load_digits_dataset
    from vit22b.tasks.fewshot import run_fewshot

    d = load_digits_dataset(8)
    flat = lambda split: split.images.reshape(len(split.labels), -1).astype(np.float64)  # noqa: E731
    table = run_fewshot(flat(d.train), d.train.labels, flat(d.val), d.val.labels, d.num_classes, SHOTS,
                        [0, 1, 2], L2_REGS)
    path.write_text(json.dumps({"task": "fewshot", "feature": "pixels", "accuracy": table}))


def run_command(command: str, scratch: Path, upstream: Path) -> dict[str, Any]:
    t0, load0 = time.perf_counter(), loadavg()
    if command == PIXELS:
        pixel_fewshot(scratch / "fewshot_pixels.json")
        rc, err = 0, ""
    else:
        proc = subprocess.run([sys.executable, "-m", "vit22b.cli", *shlex.split(command)],
                              capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        rc, err = proc.returncode, lines[-1] if lines else f"exit {proc.returncode}"
    wall = time.perf_counter() - t0
    shown = command.replace(str(scratch), "OUT").replace(str(upstream), "UP")
    out = {"command": "vit22b " + shown if command != PIXELS else "(in bench/transfer_shift.py)",
           "wall_s": wall, "load_before": load0, "load_after": loadavg()}
    if rc:
        out["error"] = err
    return out


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, acc in results.items():
        ax.plot(list(acc), [100 * a for a in acc.values()], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
    ax.set_xlabel("examples per class")
    ax.set_ylabel("digits test accuracy (%)")
    ax.set_title("few-shot ridge on digits, Fashion-MNIST backbone")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="workdirs/fashion-mnist")
    ap.add_argument("--scratch", default=None, help="where the commands write (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/transfer_shift.json")
    args = ap.parse_args(argv)
    upstream = Path(args.upstream)
    if not (upstream / "model.safetensors").exists():
        print(f"no model at {upstream}: pretraining on Fashion-MNIST first", flush=True)
        subprocess.run([sys.executable, "-m", "vit22b.cli", "train", "--data", "fashion-mnist",
                        "--workdir", str(upstream), "--no-progress"], check=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="vit22b_shift_"))
    scratch.mkdir(parents=True, exist_ok=True)
    random_init_backbone(upstream, scratch / "random_init")
    up_acc = json.loads((upstream / "final.json").read_text())["eval_accuracy"]
    table, done, fewshot_curves = [], {}, {}
    for row in rows(str(upstream), str(scratch / "random_init"), str(scratch)):
        texts = []
        for label, cmd, js, extract in row["runs"]:
            if cmd not in done:
                rec = run_command(cmd, scratch, upstream)
                if "error" not in rec:
                    rec["result"] = json.loads((scratch / js).read_text())
                done[cmd] = rec
            rec = done[cmd]
            text = rec.get("error") or extract(rec["result"])
            texts.append((label, text))
            print(f"  [{row['task']}] {label}: {text}  ({rec['wall_s']:.0f} s)", flush=True)
            if row["task"] == "fewshot" and "result" in rec:
                name = "Fashion-MNIST backbone" if label == "measured" else label
                fewshot_curves[name] = best_fewshot(rec["result"])
        main_cmd = row["runs"][0][1]
        table.append({"upstream": f"Fashion-MNIST ({pct(up_acc)} test)", "downstream": "digits (28 px)",
                      "task": row["task"], "what": row["what"], "measured": texts[0][1],
                      "baselines": "; ".join(f"{lab}: {t}" for lab, t in texts[1:]),
                      "wall_s": sum(done[c]["wall_s"] for _, c, _, _ in row["runs"]),
                      "command": done[main_cmd]["command"]})
    print("\n" + markdown_table(["upstream", "downstream", "task", "measured", "baseline(s)", "wall s"], [
        [t["upstream"], t["downstream"], f"{t['task']}: {t['what']}", t["measured"], t["baselines"] or "-",
         f"{t['wall_s']:.0f}"] for t in table]))
    png = Path(args.out).with_suffix(".png")
    plot(fewshot_curves, png)
    write_json(Path(args.out), {"command": command_line("bench/transfer_shift.py", argv),
                                "hardware": hardware(), "upstream": str(upstream), "rows": table,
                                "runs": list(done.values()),
                                "loadavg_at_end": loadavg()})
    print(f"JSON: {args.out}  plot: {png}  (OUT = {scratch}, UP = {upstream})")


if __name__ == "__main__":
    main()
