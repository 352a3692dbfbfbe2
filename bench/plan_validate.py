"""Check `vit22b plan`'s per-device memory against XLA's own accounting of the real train step.

    python bench/plan_validate.py [--out bench/results/plan_validation.json] [--only B/16]
    python bench/plan_validate.py --searches   # the paper's run and GPU clusters, no compiling
    python bench/plan_validate.py --distill    # distillation steps (22B/14 teacher -> B/16 ...)

`--searches` runs `vit22b plan 22B/14 --batch 65536 --search N` for TPUv4 at 256...4096 chips
(the paper's chip count is unknown) against the paper's 54.9% MFU and 1.15k tokens/s per chip,
and for H100/H200 at 64, 256 and 1024 GPUs, into bench/results/plan_searches.json.

For each configuration the trainer's sharded step (`train_state.state_shardings` + `make_train_step`,
state donated, batch sharded over data) is lowered with `jax.ShapeDtypeStruct` inputs on a
simulated CPU mesh and compiled; nothing is allocated, so the full 22B/14 preset fits. Compared
per device: XLA's argument bytes (params + optimizer state + batch) with the planner's
`arguments`, XLA's temporaries with the planner's `temp`, and their sum (outputs alias the
donated state) with the planner's `peak`. XLA:CPU schedules and fuses differently from the TPU
and GPU backends, so this checks the planner's bookkeeping, not a TPU's exact peak.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from vit22b.compiled_step import step_memory  # noqa: E402
from vit22b.config import preset  # noqa: E402
from vit22b.flops import flops_per_image  # noqa: E402
from vit22b.optim import OptimConfig  # noqa: E402
from vit22b.plan import HARDWARE, GiB, memory, search  # noqa: E402
from vit22b.plan_cli import format_search  # noqa: E402
from vit22b.sharding import make_mesh  # noqa: E402
from vit22b.train import TrainConfig  # noqa: E402

# (preset, image size, global batch, mesh, remat, optimizer, grad_accum, model overrides)
CONFIGS: list[tuple[str, int, int, str, str, str, int, dict[str, Any]]] = [
    ("B/16", 224, 64, "4x2", "nothing_saveable", "adafactor", 1, {}),
    ("B/16", 224, 64, "2x4", "nothing_saveable", "adafactor", 1, {}),
    ("B/16", 224, 64, "4x2", "dots_saveable", "adafactor", 1, {}),
    ("B/16", 224, 64, "4x2", "none", "adafactor", 1, {}),
    ("B/16", 224, 64, "4x2", "nothing_saveable", "adamw", 1, {}),
    ("B/16", 224, 128, "4x2", "nothing_saveable", "adafactor", 2, {}),
    ("L/14", 224, 64, "4x2", "nothing_saveable", "adafactor", 1, {}),
    ("L/14", 224, 64, "8x1", "nothing_saveable", "adafactor", 1, {}),
    ("22B/14", 224, 64, "4x4", "nothing_saveable", "adafactor", 1, {}),
    # 22B widths with few layers and a large batch: activations, not the update, set the peak
    ("22B/14", 224, 512, "4x4", "nothing_saveable", "adafactor", 1, {"depth": 4}),
    ("22B/14", 224, 512, "4x4", "dots_saveable", "adafactor", 1, {"depth": 2}),
    ("22B/14", 224, 256, "4x4", "none", "adafactor", 1, {"depth": 2}),
]


def xla_memory(name: str, image: int, batch: int, mesh_spec: str, remat: str, optimizer: str,
               grad_accum: int, overrides: dict[str, Any]) -> dict[str, float]:
    cfg = TrainConfig(model=preset(name, image_size=image, remat=remat, **overrides),
                      optim=OptimConfig(optimizer=optimizer), batch_size=batch, mesh=mesh_spec,  # type: ignore[arg-type]
                      grad_accum=grad_accum)
    data, model = (int(x) for x in mesh_spec.split("x"))
    start = time.time()
    xla = step_memory(cfg, make_mesh(mesh_spec, jax.devices()[: data * model]))
    return {**xla, "compile_seconds": time.time() - start}


# Distillation steps: (teacher, student, batch, mesh); 224 px, teacher matmuls in bfloat16.
DISTILL_CONFIGS: list[tuple[str, str, int, str]] = [
    ("22B/14", "B/16", 64, "4x4"),  # the paper's distillation (ViT-22B -> ViT-B, 88.6% ImageNet)
    ("22B/14", "B/16", 128, "8x2"),
    ("22B/14", "L/16", 64, "4x4"),
    ("L/14", "B/16", 64, "4x4"),
]


def xla_distill_memory(teacher_name: str, student_name: str, batch: int, mesh_spec: str
                       ) -> dict[str, float]:
    """The real distillation step (the student's train step with the distillation objective and
    the teacher's f32 params as a frozen sharded input), compiled abstractly."""
    student = preset(student_name, image_size=224)
    teacher = preset(teacher_name, image_size=224, dtype_mm="bfloat16", remat="none")
    cfg = TrainConfig(model=student, batch_size=batch, mesh=mesh_spec, teacher="<abstract>",
                      loss="softmax")
    data, model = (int(x) for x in mesh_spec.split("x"))
    start = time.time()
    xla = {**step_memory(cfg, make_mesh(mesh_spec, jax.devices()[: data * model]), teacher=teacher),
           "compile_seconds": time.time() - start}
    planned = memory(student, batch, data, model, teacher=teacher)
    return {"teacher": teacher_name, "student": student_name, "batch": batch, "mesh": mesh_spec,
            "planned_bytes": planned, "xla_bytes": xla,
            **{f"{k}_rel_error": planned[k] / xla[k] - 1 for k in ("arguments", "temp", "peak")}}


def distill_rows(out: str) -> None:
    print("distillation steps, per-device GiB, planned vs XLA memory_analysis()")
    rows = []
    for teacher, student, batch, mesh_spec in DISTILL_CONFIGS:
        r = xla_distill_memory(teacher, student, batch, mesh_spec)
        rows.append(r)
        print(f"{teacher} -> {student} batch {batch} mesh {mesh_spec}: " + ", ".join(
            f"{k} {r['planned_bytes'][k] / GiB:.3f}/{r['xla_bytes'][k] / GiB:.3f} "
            f"({r[f'{k}_rel_error']:+.1%})" for k in ("arguments", "temp", "peak")), flush=True)
    Path(out).write_text(json.dumps({"description": __doc__, "jax": jax.__version__,
                                     "platform": platform.platform(), "rows": rows}, indent=2))
    print(f"wrote {out}")


PAPER = {"mfu": 0.549, "tokens_per_second_per_chip": 1150.0}  # vit22b-facts.md, section 2


def searches(out: str) -> None:
    cfg, batch, result = preset("22B/14"), 65536, {}
    implied = PAPER["tokens_per_second_per_chip"] * flops_per_image(cfg)["train"] / cfg.num_patches
    print(f"paper: {PAPER['mfu']:.1%} MFU, {PAPER['tokens_per_second_per_chip']:,.0f} tokens/s/chip "
          f"(= {implied / HARDWARE['tpuv4'].peak_flops:.1%} MFU by flops.py's count)")
    for name, counts in (("tpuv4", (256, 512, 1024, 2048, 4096)), ("h100", (64, 256, 1024)),
                         ("h200", (64, 256, 1024))):
        for n in counts:
            found = search(cfg, batch, n, HARDWARE[name])
            print(f"\nvit22b plan 22B/14 --batch {batch} --hardware {name} --search {n}\n"
                  + format_search(found, 4))
            result[f"{name}_{n}"] = [{k: p[k] for k in ("mesh", "remat", "grad_accum", "memory_bytes",
                                                        "t_compute", "t_comm", "overlap", "no_overlap")}
                                     for p in found[:4]]
    Path(out).write_text(json.dumps({"paper": PAPER, "batch": batch, "image_size": 224,
                                     "best_plans": result}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/plan_validation.json")
    ap.add_argument("--only", default=None, help="run only configs of this preset")
    ap.add_argument("--searches", action="store_true", help="best meshes instead of validating")
    ap.add_argument("--distill", action="store_true", help="validate distillation steps instead "
                    "(teacher -> student), into bench/results/plan_validation_distill.json")
    args = ap.parse_args()
    if args.searches:
        return searches("bench/results/plan_searches.json")
    if args.distill:
        return distill_rows("bench/results/plan_validation_distill.json")
    rows = []
    head = (f"{'preset':<7}{'batch':>6} {'mesh':<5}{'remat':<17}{'opt':<10}{'acc':>3} {'extra':<11}"
            f"{'args plan/xla':>16} {'err':>6} {'temp plan/xla':>16} {'err':>6} "
            f"{'peak plan/xla':>16} {'err':>6}")
    print("per-device GiB, planned vs XLA memory_analysis()\n" + head)
    for name, image, batch, mesh_spec, remat, optimizer, accum, overrides in CONFIGS:
        if args.only and name != args.only:
            continue
        data, model = (int(x) for x in mesh_spec.split("x"))
        cfg = preset(name, image_size=image, remat=remat, **overrides)
        planned = memory(cfg, batch, data, model, remat, optimizer, accum)
        xla = xla_memory(name, image, batch, mesh_spec, remat, optimizer, accum, overrides)
        row: dict[str, Any] = {"preset": name, "image_size": image, "batch": batch, "mesh": mesh_spec,
                               "remat": remat, "optimizer": optimizer, "grad_accum": accum,
                               "overrides": overrides, "planned_bytes": planned, "xla_bytes": xla}
        line = (f"{name:<7}{batch:>6} {mesh_spec:<5}{remat:<17}{optimizer:<10}{accum:>3} "
                f"{','.join(f'{k}={v}' for k, v in overrides.items()):<11}")
        for key in ("arguments", "temp", "peak"):
            err = planned[key] / xla[key] - 1
            row[f"{key}_rel_error"] = err
            line += f"{planned[key] / GiB:8.3f}/{xla[key] / GiB:<7.3f} {err:+6.1%} "
        rows.append(row)
        print(line, flush=True)
    worst = max(abs(r["peak_rel_error"]) for r in rows)
    worst_temp = max(abs(r["temp_rel_error"]) for r in rows)
    print(f"largest |error|: peak {worst:.1%}, temp {worst_temp:.1%}")
    out = {"description": __doc__, "jax": jax.__version__, "platform": platform.platform(),
           "xla_flags": os.environ["XLA_FLAGS"], "rows": rows,
           "max_abs_peak_rel_error": worst, "max_abs_temp_rel_error": worst_temp}
    if args.only is None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
