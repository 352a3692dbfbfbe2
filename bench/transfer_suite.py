"""Every transfer command on one checkpoint, one results table (the README's "Transfer" table).

    python bench/transfer_suite.py --checkpoint workdirs/digits --out bench/results/transfer_digits.json

Runs each `vit22b` transfer sub-command as a user would (a child process each, its JSON written to
a scratch directory), collects the headline numbers, and prints a markdown table with the exact
command of every row. Without --checkpoint's directory it first trains the default digits model
(`vit22b train`). Every number is from this run; nothing is copied in.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import command_line, hardware, markdown_table, write_json

Extract = Callable[[dict[str, Any]], str]


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def fewshot_cell(r: dict[str, Any]) -> str:
    acc = r["accuracy"]
    first, last = next(iter(acc)), list(acc)[-1]
    lam = next(iter(acc[first]))
    lam_value = lam.removeprefix("l2=")
    return (
        f"{first} {pct(acc[first][lam]['mean'])}, {last} {pct(acc[last][lam]['mean'])} (lambda {lam_value})"
    )


def robustness_cell(r: dict[str, Any]) -> str:
    shifts = {k: v["accuracy"] for k, v in r["shifts"].items() if k != "identity"}
    c = r["calibration"]
    cells = ", ".join(f"{k} {pct(v)}" for k, v in list(shifts.items())[:3])
    return f"{cells}; ECE {c['ece']:.4f} -> {c['ece_scaled']:.4f} (T = {c['temperature']:.2f})"


def lit_cell(r: dict[str, Any]) -> str:
    z = r["zero_shot"]
    unseen = (
        f", unseen-prompt ensemble {pct(z['unseen_ensemble_top1'])}" if "unseen_ensemble_top1" in z else ""
    )
    return f"zero-shot {pct(z['top1'])} (mean single prompt {pct(z['mean_single_top1'])}{unseen})"


def video_cell(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {pct(v['val_accuracy'])}" for k, v in r["heads"].items()) + (
        f" (chance {pct(r['chance'])})"
    )


def segment_cell(r: dict[str, Any]) -> str:
    b = r["baseline"]
    return (
        f"mIoU {pct(r['val_miou'])}, pixel acc. {pct(r['val_pixel_accuracy'])} "
        f"(majority-class baseline mIoU {pct(b['val_miou'])})"
    )


def depth_cell(r: dict[str, Any]) -> str:
    b = r["baseline_train_mean_per_pixel"]
    return (
        f"AbsRel {r['val_abs_rel']:.3f}, delta<1.25 {pct(r['val_delta1'])} "
        f"(per-pixel train-mean baseline {b['abs_rel']:.3f} / {pct(b['delta1'])})"
    )


def suite(w: str, scratch: Path) -> list[tuple[str, str, list[str], Path, Extract]]:
    """(task, what, argv, JSON path, headline extractor) for every row. In the command templates
    {w} is the checkpoint and {s} the scratch directory."""
    top1: Extract = lambda r: f"top-1 {pct(r['val_accuracy'])}"  # noqa: E731
    ft = "finetune --checkpoint {w} --image-size 32 --steps 200 --batch-size 64"
    seg = "segment --checkpoint {w} --image-size 32"
    rows = [  # (task, what, command template, JSON file under scratch, extractor)
        ("probe", "linear probe on frozen pre_logits", "probe --checkpoint {w} --out {s}/probe.json",
         "probe.json", top1),
        ("fewshot", "closed-form ridge, shots 1..25 x 3 seeds",
         "fewshot --checkpoint {w} --out {s}/fewshot.json", "fewshot.json", fewshot_cell),
        ("finetune", "new zero head, posemb 16 -> 32 px, cosine",
         ft + " --workdir {s}/ft --no-progress", "ft/finetune.json", top1),
        ("finetune", "the same from scratch (baseline)",
         ft + " --from-scratch --workdir {s}/ft0 --no-progress", "ft0/finetune.json", top1),
        ("distill", "teacher -> fresh mu/4 student, t^2 KL",
         "distill --teacher {w} --student-preset mu/4 --steps 500 --batch-size 64"
         " --workdir {s}/st --no-progress",
         "st/distill.json",
         lambda r: f"student {pct(r['student_val_accuracy'])} (teacher {pct(r['teacher_val_accuracy'])})"),
        ("robustness", "shifted val copies; calibration",
         "robustness --checkpoint {w} --out {s}/robustness.json --no-progress", "robustness.json",
         robustness_cell),
        ("lit", "text tower on locked image features", "lit --checkpoint {w} --workdir {s}/lit --no-progress",
         "lit/lit.json", lit_cell),
        ("segment", "linear decoder on frozen patch tokens, digit canvases at 32 px (posemb resampled)",
         seg + " --decoder linear --out {s}/seg_linear.json --no-progress", "seg_linear.json", segment_cell),
        ("segment", "DPT-style decoder (4 layers), the same data",
         seg + " --decoder dpt --out {s}/seg_dpt.json --no-progress", "seg_dpt.json", segment_cell),
        ("depth", "DPT-style decoder, rendered scenes with exact depth, 32 px",
         "depth --checkpoint {w} --image-size 32 --out {s}/depth.json --no-progress", "depth.json",
         depth_cell),
        ("video", "per-frame features + temporal heads",
         "video --checkpoint {w} --out {s}/video.json --no-progress", "video.json", video_cell),
    ]
    quoted = {"w": shlex.quote(w), "s": shlex.quote(str(scratch))}
    return [(task, what, shlex.split(template.format(**quoted)), scratch / out, extract)
            for task, what, template, out, extract in rows]


def print_table(rows: list[dict[str, Any]], checkpoint: str, out: str) -> None:
    print(
        "\n"
        + markdown_table(
            ["command", "what", "measured", "wall s"],
            [
                [
                    f"`{r['command']}`",
                    r["what"],
                    r.get("headline", "error: " + r.get("error", "")),
                    f"{r['wall_s']:.0f}",
                ]
                for r in rows
            ],
        )
    )
    print(f"(OUT = a scratch directory; W = {checkpoint}) JSON: {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="workdirs/digits")
    ap.add_argument("--tasks", nargs="+", default=None, help="only these sub-commands")
    ap.add_argument("--scratch", default=None, help="where the commands write (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/transfer_digits.json")
    ap.add_argument("--render", action="store_true", help="only re-print the table of an existing --out JSON")
    args = ap.parse_args(argv)
    if args.render:
        # rows are matched to the suite by their command; the labels and headlines are re-derived
        known = {"vit22b " + shlex.join(a): (w, e) for _, w, a, _, e in suite(args.checkpoint, Path("OUT"))}
        rows = json.loads(Path(args.out).read_text())["rows"]
        for r in rows:
            r["what"], extract = known[r["command"]]
            if "result" in r:
                r["headline"] = extract(r["result"])
        print_table(rows, args.checkpoint, args.out)
        return
    vit22b = [sys.executable, "-m", "vit22b.cli"]
    if not (Path(args.checkpoint) / "model.safetensors").exists():
        print(f"no checkpoint at {args.checkpoint}: training the default digits model first", flush=True)
        subprocess.run([*vit22b, "train", "--workdir", args.checkpoint, "--no-progress"], check=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="vit22b_transfer_"))
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    if args.tasks and out.exists():  # a partial rerun updates its rows in the existing table
        commands = {"vit22b " + shlex.join(a) for _, _, a, _, _ in suite(args.checkpoint, Path("OUT"))}
        rows = [
            r
            for r in json.loads(out.read_text())["rows"]
            if r["task"] not in args.tasks and r["command"] in commands
        ]
    for task, what, task_argv, json_path, extract in suite(args.checkpoint, scratch):
        if args.tasks and task not in args.tasks:
            continue
        shown = "vit22b " + shlex.join(task_argv).replace(str(scratch), "OUT")
        print(f"  {shown}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([*vit22b, *task_argv], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        row: dict[str, Any] = {"task": task, "what": what, "command": shown, "wall_s": wall}
        if proc.returncode:
            row["error"] = (
                proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            )
        else:
            row["result"] = json.loads(json_path.read_text())
            row["headline"] = extract(row["result"])
        print(f"    {row.get('headline', row.get('error'))}  ({wall:.0f} s)", flush=True)
        rows.append(row)
        order = {
            "vit22b " + shlex.join(a): i
            for i, (_, _, a, _, _) in enumerate(suite(args.checkpoint, Path("OUT")))
        }
        rows.sort(key=lambda r: order.get(r["command"], len(order)))
        write_json(
            Path(args.out),
            {
                "command": command_line("bench/transfer_suite.py", argv),
                "hardware": hardware(),
                "checkpoint": args.checkpoint,
                "rows": rows,
            },
        )
    print_table(rows, args.checkpoint, args.out)


if __name__ == "__main__":
    main()
