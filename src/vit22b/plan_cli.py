"""`vit22b plan`: the planner's command line and its printed tables (the model is plan.py).

    vit22b plan 22B/14 --batch 65536 --mesh 256x16 --hardware tpuv4
    vit22b plan 22B/14 --batch 65536 --search 4096 --hardware tpuv4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from vit22b.config import ConfigError, ModelConfig, preset
from vit22b.plan import HARDWARE, HEADROOM, REMATS, GiB, Hardware, plan, search


def format_plan(p: dict[str, Any]) -> str:
    mem, hw = p["memory_bytes"], p["hardware"]
    teacher = p.get("teacher")
    lines = [f"{p['mesh']} mesh ({p['devices']} x {hw['name']}), batch {p['batch']}, remat "
             f"{p['remat']}, {p['optimizer']}, grad_accum {p['grad_accum']}"
             + (f", distilling a {teacher['width']}w x {teacher['depth']}d teacher" if teacher else ""),
             "memory per device (GiB):"]
    for k in ("params", "opt_state", "inputs", "teacher_params", "teacher_forward", "grads",
              "saved_activations", "working_activations", "update_phase", "temp", "peak"):
        if k in mem:
            lines.append(f"  {k:<20} {mem[k] / GiB:9.3f}")
    lines.append(f"  HBM {hw['hbm_bytes'] / GiB:.1f} GiB: {'fits' if p['fits'] else 'DOES NOT FIT'}"
                 f" (<= {HEADROOM:.0%})")
    fl = p["flops"]
    lines.append(f"FLOPs per step: useful {fl['useful']:.3e}, remat recompute "
                 f"{fl['remat_recompute']:.3e}, per device {fl['per_device']:.3e}")
    lines.append("collectives per step (bytes per device):")
    for c in p["collectives"]:
        lines.append(f"  {c['name']:<24} {c['axis']:<6} {c['bytes'] / GiB:9.3f} GiB  "
                     f"{c['link']} {c['bandwidth'] / 1e9:.0f} GB/s  {c['seconds'] * 1e3:9.1f} ms")
    lines.append(f"t_compute {p['t_compute'] * 1e3:.1f} ms, t_comm {p['t_comm'] * 1e3:.1f} ms")
    for mode in ("no_overlap", "overlap"):
        r = p[mode]
        lines.append(f"{mode:<10}: step {r['step_seconds']:.3f} s, MFU {r['mfu']:.1%}, "
                     f"{r['tokens_per_second_per_device']:,.0f} tokens/s/device")
    return "\n".join(lines)


def format_search(found: list[dict[str, Any]], top: int = 8) -> str:
    if not found:
        return "no plan fits"
    lines = [f"{len(found)} plans fit; best by MFU (overlap):",
             f"  {'mesh':>9} {'remat':<17} {'accum':>5} {'peak GiB':>9} {'MFU':>6} {'MFU no-ovl':>10} "
             f"{'step s':>7} {'comm/comp':>9} {'tok/s/dev':>9}"]
    for p in found[:top]:
        lines.append(f"  {p['mesh']:>9} {p['remat']:<17} {p['grad_accum']:>5} "
                     f"{p['memory_bytes']['peak'] / GiB:9.2f} {p['overlap']['mfu']:6.1%} "
                     f"{p['no_overlap']['mfu']:10.1%} {p['overlap']['step_seconds']:7.3f} "
                     f"{p['t_comm'] / p['t_compute']:9.2f} "
                     f"{p['overlap']['tokens_per_second_per_device']:9,.0f}")
    return "\n".join(lines)


def _hardware(args: argparse.Namespace) -> Hardware:
    hw = HARDWARE[args.hardware]
    hbm = args.hbm_gib * GiB if args.hbm_gib else None
    changes = {k: v for k, v in (("peak_flops", args.peak), ("hbm_bytes", hbm),
                                 ("intra_bw", args.intra_bw), ("inter_bw", args.inter_bw),
                                 ("node_size", args.node_size)) if v}
    return dataclasses.replace(hw, **changes)


def _plan_config(args: argparse.Namespace) -> ModelConfig:
    """The preset's config, or a checkpoint's own (e.g. an imported timm / big_vision model)."""
    if (args.preset is None) == (args.checkpoint is None):
        raise ConfigError("plan: give a preset (e.g. 22B/14) or --checkpoint DIR, not both")
    sizes = {k: v for k, v in (("image_size", args.image_size), ("num_classes", args.num_classes))
             if v is not None}
    if args.preset is not None:
        return preset(args.preset, **{"image_size": 224, "num_classes": 1000, **sizes})
    from vit22b.weights import read_weights

    _, cfg = read_weights(args.checkpoint)
    if cfg is None:
        raise ConfigError(f"{args.checkpoint} carries no vit22b config: plan a preset instead")
    return cfg.replace(**sizes)


def _teacher_config(args: argparse.Namespace, student: ModelConfig) -> ModelConfig | None:
    """`--teacher` (a preset or a model dir) as a distillation step runs it: forward only, its
    matmuls in --teacher-dtype, at --teacher-image-size (default: the student's)."""
    if args.teacher is None:
        return None
    if "/" in args.teacher and not Path(args.teacher).exists():
        teacher = preset(args.teacher)
    else:
        from vit22b.weights import read_config

        teacher = read_config(args.teacher)
        if teacher is None:
            raise ConfigError(f"--teacher {args.teacher}: no vit22b config there; give a preset")
    return teacher.replace(image_size=args.teacher_image_size or student.image_size,
                           num_classes=student.num_classes, in_channels=student.in_channels,
                           dtype_mm=args.teacher_dtype, remat="none")


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _plan_config(args)
    args.preset = args.preset or str(args.checkpoint)
    hw = _hardware(args)
    if args.search:
        found = search(cfg, args.batch, args.search, hw, args.optimizer)
        if args.json:
            print(json.dumps(found[: args.top], indent=2))
        else:
            print(f"{args.preset} batch {args.batch} on {args.search} x {hw.name}: ", end="")
            print(format_search(found, args.top))
        return 0
    from vit22b.sharding import parse_mesh

    try:
        sizes = [int(x) for x in args.mesh.lower().split("x")]
    except ValueError:
        raise ConfigError(f"--mesh {args.mesh!r}: write DATAxMODEL, e.g. 256x16") from None
    if -1 in sizes and not args.devices:
        raise ConfigError(f"--mesh={args.mesh} fills from the device count: add --devices N")
    devices = args.devices or math.prod(sizes)
    data, model = parse_mesh(args.mesh, devices)
    p = plan(cfg, args.batch, data, model, hw, args.remat, args.optimizer, args.grad_accum,
             _teacher_config(args, cfg))
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `vit22b plan` on a cli's sub-parsers (sets its own `func`)."""
    p = subparsers.add_parser("plan", help="per-device memory, collectives and predicted MFU of "
                              "a preset on a mesh (analytic; --search finds the best mesh)")
    p.add_argument("preset", nargs="?", default=None, help="e.g. 22B/14 (or --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="plan a model dir's own config instead of a "
                   "preset (e.g. one `vit22b import` wrote)")
    p.add_argument("--batch", type=int, default=65536, help="global batch (paper: 65,536)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (or the checkpoint's)")
    p.add_argument("--num-classes", type=int, default=None, help="default 1000 (or the checkpoint's)")
    p.add_argument("--mesh", default="1x1", help="DATAxMODEL as for train (e.g. 256x16, or "
                   "--mesh=-1x16 --devices 4096)")
    p.add_argument("--devices", type=int, default=None, help="device count (needed with -1 in --mesh)")
    p.add_argument("--remat", choices=REMATS, default="nothing_saveable")
    p.add_argument("--optimizer", choices=["adafactor", "adamw", "sgd"], default="adafactor")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="tpuv4")
    p.add_argument("--peak", type=float, default=None, help="override peak FLOP/s per device")
    p.add_argument("--hbm-gib", type=float, default=None, help="override HBM per device")
    p.add_argument("--intra-bw", type=float, default=None, help="override intra-node B/s")
    p.add_argument("--inter-bw", type=float, default=None, help="override inter-node B/s")
    p.add_argument("--node-size", type=int, default=None, help="override devices per node")
    p.add_argument("--search", type=int, default=None, metavar="DEVICES",
                   help="enumerate meshes, remat and grad_accum for DEVICES devices")
    p.add_argument("--top", type=int, default=8, help="--search: how many plans to print")
    p.add_argument("--teacher", default=None, help="plan a distillation step: the frozen teacher, a "
                   "preset (e.g. 22B/14) or a model dir; the positional preset is the student")
    p.add_argument("--teacher-image-size", type=int, default=None, help="default: the student's")
    p.add_argument("--teacher-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="the teacher's matmuls (its params are float32)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    return p
