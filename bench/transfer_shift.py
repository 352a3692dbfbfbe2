"""Transfer across data sets: backbones pretrained on Fashion-MNIST, evaluated where they never looked.

    python bench/transfer_shift.py --upstream workdirs/fashion-mnist \
        --upstream-7 workdirs/fashion-mnist-classes-0-6 --out bench/results/transfer_shift.json

The paper's protocol in miniature, on two shifts (an upstream missing from its work dir is trained
here first with `vit22b train`, about 20 minutes each on 2 cores):

1. `digits`: upstream = `--data fashion-mnist` (all ten classes); downstream = scikit-learn's digits
   (1,797 images, 8x8, upsampled to 28 px; the fixed 20% held-out split): images and classes the
   backbone never saw.
2. `fashion-7to10`: upstream = `--data fashion-mnist:classes=0-6` (T-shirt ... shirt, but no
   sneaker, bag or ankle boot); downstream = all ten classes, reported also on the three held-out
   classes alone; the ten-class upstream (which saw them) is the ceiling beside it.

Every transfer command runs as a user would run it (a child process each), and every figure stands
beside the baselines that give it meaning:

- probe, few-shot: the same architecture with random weights, frozen (what pretraining adds);
  few-shot also against ridge on the raw pixels (what any backbone adds);
- finetune (28 px, and on digits 56 px with the posemb resampled): the same model from scratch,
  same budget;
- distill (digits; teacher = the fine-tuned model): the same student trained on the labels alone
  (`--label-weight 1`), same budget;
- lit (image tower = the upstream backbone, locked; text tower trained on captions of the downstream
  training images only): beside the linear probe on the same frozen features.

Prints a markdown table (upstream, downstream, task, measured, baselines, wall time), writes the JSON,
and a PNG of few-shot accuracy against shots per shift. Every number is from this run.
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


PIXELS = "PIXELS"  # not a vit22b command: pixel_fewshot below (PIXELS --data DATA)
HELD_OUT = (7, 8, 9)  # Fashion-MNIST's sneaker, bag, ankle boot: never seen by the 7-class upstream
SEVEN = "fashion-mnist:classes=0-6"


def probe_text(r: dict[str, Any]) -> str:
    """top-1, and on the classes the 7-class upstream never saw (equal-sized in the test split)."""
    if r.get("data") != "fashion-mnist":
        return top1(r)
    per_class = list(r["val_accuracy_per_class"].values())
    return f"{top1(r)} (held-out classes {pct(float(np.mean([per_class[c] for c in HELD_OUT])))})"


def rows(shift: str, q: dict[str, str]) -> list[dict[str, Any]]:
    """Per task of one shift: runs = [(label, command, JSON it writes under the scratch dir s,
    headline)], the measured one first, then its baselines. A command shared by two rows runs once.
    q: the format keys (up = upstream, rnd = its random-init twin, s = scratch dir, data, up10)."""
    fs = "fewshot --data {data} --shots 1 5 10 25 --l2-reg 1 32 1024 --no-progress"
    ft = "finetune --data {data} --steps 300 --batch-size 64 --no-progress"
    st = "distill --teacher {s}/ft28 --data {data} --student-preset nano/7 --steps 500 --no-progress"
    probe = ("probe --checkpoint {up} --data {data} --no-progress --out {s}/probe.json", "probe.json",
             probe_text)
    spec = [  # (task, what, (command, json, headline), [(baseline label, command, json, headline)])
        ("probe", "linear probe on frozen pre_logits", probe,
         [("random-init backbone", "probe --checkpoint {rnd} --data {data} --no-progress "
           "--out {s}/probe_random.json", "probe_random.json", probe_text)]),
        ("fewshot", "closed-form ridge on frozen pre_logits, 3 seeds",
         (fs + " --checkpoint {up} --out {s}/fewshot.json", "fewshot.json", fewshot_text),
         [("random-init backbone", fs + " --checkpoint {rnd} --out {s}/fewshot_random.json",
           "fewshot_random.json", fewshot_text),
          ("pixels + ridge", PIXELS + " --data {data}", "fewshot_pixels.json", fewshot_text)]),
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
         ("robustness --checkpoint {s}/ft28 --data {data} --no-progress --out {s}/robustness.json",
          "robustness.json", robustness_cell), []),
        ("lit", "text tower on downstream captions only, upstream backbone locked",
         ("lit --checkpoint {up} --data {data} --workdir {s}/lit --no-progress", "lit/lit.json", lit_cell),
         [("linear probe on the same features", *probe)]),
    ]
    if shift == "fashion-7to10":  # the second shift: no 56 px or distillation rows (the first has them)
        spec = [row for row in spec if not row[1].startswith("at 56") and row[0] != "distill"]
        ceiling = ("the 10-class upstream (saw every class)", "{up10}", "_up10")
        for task, _, _, base in spec:
            if task in ("probe", "fewshot"):
                _, cmd, js, extract = base[0]
                base.append((ceiling[0], cmd.replace("{rnd}", ceiling[1]).replace("_random", ceiling[2]),
                             js.replace("_random", ceiling[2]), extract))
    qq = {k: shlex.quote(v) for k, v in q.items()}
    return [{"task": task, "what": what,
             "runs": [(label, cmd.format(**qq), js, extract)
                      for label, cmd, js, extract in [("measured", *main), *base]]}
            for task, what, main, base in spec]


def random_init_backbone(upstream: Path, out: Path) -> None:
    """The upstream's architecture with fresh random weights: what pretraining is measured against."""
    from vit22b.model import init_model, split_params
    from vit22b.weights import read_config, save_model

    cfg = read_config(upstream)  # the header only: the upstream's weights are not needed here
    _, params = split_params(init_model(cfg, seed=0))
    save_model(out, params, cfg)


def pixel_fewshot(path: Path, data: str) -> None:
    """Ridge few-shot on the raw pixels at the data's native size (digits 8x8 = 64-d, Fashion-MNIST
    28x28 = 784-d), the same shots, seeds and lambdas as the backbones."""
    from vit22b.data import load_dataset
    from vit22b.tasks.fewshot import run_fewshot

    d = load_dataset(data, None if data != "digits" else 8)
    flat = lambda split: split.images.reshape(len(split.labels), -1).astype(np.float64)  # noqa: E731
    table = run_fewshot(flat(d.train), d.train.labels, flat(d.val), d.val.labels, d.num_classes, SHOTS,
                        [0, 1, 2], L2_REGS)
    path.write_text(json.dumps({"task": "fewshot", "feature": "pixels", "accuracy": table}))


def run_command(command: str, s: Path, data: str, shown_as: dict[str, str]) -> dict[str, Any]:
    """Runs one row's command (writing under s); `shown_as`: paths -> the short names the table shows."""
    t0, load0 = time.perf_counter(), loadavg()
    pixels = command.startswith(PIXELS)
    if pixels:
        pixel_fewshot(s / "fewshot_pixels.json", data)
        rc, err = 0, ""
    else:
        proc = subprocess.run([sys.executable, "-m", "vit22b.cli", *shlex.split(command)],
                              capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        rc, err = proc.returncode, lines[-1] if lines else f"exit {proc.returncode}"
    wall = time.perf_counter() - t0
    shown = command
    for path, name in shown_as.items():
        shown = shown.replace(path, name)
    out = {"command": "vit22b " + shown if not pixels else "(in bench/transfer_shift.py)",
           "wall_s": wall, "load_before": load0, "load_after": loadavg()}
    if rc:
        out["error"] = err
    return out


# shift -> (upstream flag, upstream label, downstream data, downstream label)
SHIFTS = {
    "digits": ("upstream", "Fashion-MNIST", "digits", "digits (28 px)"),
    "fashion-7to10": ("upstream_7", "Fashion-MNIST, classes 0-6", "fashion-mnist",
                      "Fashion-MNIST, all 10 classes"),
}


def plot(curves: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (shift, results) in zip(axes[0], curves.items(), strict=True):
        for label, acc in results.items():
            ax.plot(list(acc), [100 * a for a in acc.values()], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
        ax.set_xlabel("examples per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"few-shot ridge: {SHIFTS[shift][1]} -> {SHIFTS[shift][3]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pretrain(upstream: Path, data: str) -> None:
    if not (upstream / "model.safetensors").exists():
        print(f"no model at {upstream}: pretraining on {data} first (about 20 minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "vit22b.cli", "train", "--data", data,
                        "--workdir", str(upstream), "--no-progress"], check=True)


def run_shift(shift: str, upstreams: dict[str, Path], scratch: Path, done: dict[str, Any],
              curves: dict[str, dict[str, dict[int, float]]]) -> list[dict[str, Any]]:
    """Every row of one shift (upstream -> downstream): runs its commands, returns the table rows."""
    up_key, up_label, data, down_label = SHIFTS[shift]
    upstream = upstreams[up_key]
    s = scratch / shift
    s.mkdir(parents=True, exist_ok=True)
    random_init_backbone(upstream, s / "random_init")
    up_acc = json.loads((upstream / "final.json").read_text())["eval_accuracy"]
    q = {"up": str(upstream), "rnd": str(s / "random_init"), "s": str(s), "data": data,
         "up10": str(upstreams["upstream"])}
    shown_as = {str(scratch): "OUT", str(upstreams["upstream_7"]): "UP7", str(upstreams["upstream"]): "UP"}
    table = []
    for row in rows(shift, q):
        texts = []
        for label, cmd, js, extract in row["runs"]:
            if cmd not in done:
                rec = run_command(cmd, s, data, shown_as)
                if "error" not in rec:
                    rec["result"] = json.loads((s / js).read_text())
                done[cmd] = rec
                write_json(scratch / "runs.json", done)  # a rerun with this --scratch resumes here
            rec = done[cmd]
            text = rec.get("error") or extract(rec["result"])
            texts.append((label, text))
            print(f"  [{shift}: {row['task']}] {label}: {text}  ({rec['wall_s']:.0f} s)", flush=True)
            if row["task"] == "fewshot" and "result" in rec:
                name = "pretrained backbone" if label == "measured" else label
                curves.setdefault(shift, {})[name] = best_fewshot(rec["result"])
        main_cmd = row["runs"][0][1]
        table.append({"upstream": f"{up_label} ({pct(up_acc)} test)", "downstream": down_label,
                      "task": row["task"], "what": row["what"], "measured": texts[0][1],
                      "baselines": "; ".join(f"{lab}: {t}" for lab, t in texts[1:]),
                      "wall_s": sum(done[c]["wall_s"] for _, c, _, _ in row["runs"]),
                      "command": done[main_cmd]["command"]})
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="workdirs/fashion-mnist", help="pretrained on all of Fashion-MNIST")
    ap.add_argument("--upstream-7", default="workdirs/fashion-mnist-classes-0-6",
                    help="pretrained on Fashion-MNIST's classes 0-6 only (`--data " + SEVEN + "`)")
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    ap.add_argument("--scratch", default=None, help="where the commands write (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/transfer_shift.json")
    args = ap.parse_args(argv)
    upstreams = {"upstream": Path(args.upstream), "upstream_7": Path(args.upstream_7)}
    pretrain(upstreams["upstream"], "fashion-mnist")
    if "fashion-7to10" in args.shifts:
        pretrain(upstreams["upstream_7"], SEVEN)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="vit22b_shift_"))
    # finished commands of an earlier run with this --scratch (measured then, with their loads)
    record = scratch / "runs.json"
    done: dict[str, Any] = json.loads(record.read_text()) if record.exists() else {}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    table = [row for shift in args.shifts for row in run_shift(shift, upstreams, scratch, done, curves)]
    print("\n" + markdown_table(["upstream", "downstream", "task", "measured", "baseline(s)", "wall s"], [
        [t["upstream"], t["downstream"], f"{t['task']}: {t['what']}", t["measured"], t["baselines"] or "-",
         f"{t['wall_s']:.0f}"] for t in table]))
    png = Path(args.out).with_suffix(".png")
    plot(curves, png)
    write_json(Path(args.out), {"command": command_line("bench/transfer_shift.py", argv),
                                "hardware": hardware(),
                                "upstreams": {k: str(v) for k, v in upstreams.items()},
                                "rows": table, "runs": list(done.values()), "loadavg_at_end": loadavg()})
    print(f"JSON: {args.out}  plot: {png}  (OUT = {scratch})")


if __name__ == "__main__":
    main()
