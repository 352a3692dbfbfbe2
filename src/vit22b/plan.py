"""The planner behind `vit22b plan` (its command line: plan_cli.py): per-device memory, FLOPs,
collectives and a roofline step time for a mesh.

    vit22b plan 22B/14 --batch 65536 --mesh 256x16 --hardware tpuv4
    vit22b plan 22B/14 --batch 65536 --hardware h100 --search 1024

Parameters and optimizer state are sized from the trainer's own sharding rules: `train_state.state_shardings`
on a `jax.sharding.AbstractMesh` of the requested shape (no devices needed, any size), so the
planner cannot drift from what `vit22b train` allocates. Everything else is a formula, below.

Memory per device (b = micro-batch per data shard, T tokens, D width, Dm = D/m, Hm = heads/m,
F = 3*head_dim + mlp/heads, Fo = head_dim + mlp/heads, s = bytes of dtype_mm; "f32" = 4 bytes):
  arguments   params (f32) + optimizer state + this device's images and labels + step counter
  grads       f32, sharded like the params (grad_accum > 1: x3, the scan's old and new
              accumulator beside the micro-batch's gradients, plus a reshaped copy of the batch)
  saved       what the layer scan keeps for the backward pass, per layer x depth:
                nothing_saveable  the block input x [b,T,Dm] f32
                dots_saveable     x + matmul outputs: fused [b,T,Hm,F] f32, logits [b,Hm,T,T]
                                  f32, attention output [b,T,Hm,hd] s, out-projection [b,T,Dm] f32
                none              every residual autodiff keeps (`layer_residuals`, the list
                                  jax.ad_checkpoint.print_saved_residuals prints for the block)
  working     one layer's backward pass (`layer_working`). XLA fuses elementwise chains into
              their matmuls, so what is materialised is the matmuls' operands (dtype_mm) and
              results (f32), rebuilt by the recompute (nothing_saveable: both; dots_saveable:
              the operands), their cotangents, the layer's kernels gathered over data (dtype_mm)
              and their f32 gradients before the reduce-scatter
  update      the optimizer step: grads + the new params and optimizer state, all alive at once
              because the trainer keeps the old state for its non-finite-step guard
  temp        max(grads + saved + working, update);  peak = arguments + temp
bench/plan_validate.py checks these against XLA's memory_analysis() of the real sharded step
(|peak error| <= 10% from B/16 to the full 22B/14). The activation and model-axis formulas are
those of the parallel block (the default); for block="sequential" they are approximate.

Time (a roofline, no overlap model beyond the two bounds):
  t_compute = step FLOPs per device / peak; step FLOPs = flops_per_image train x batch, plus the
              forward recompute of the encoder under nothing_saveable (dots_saveable recomputes
              no matmuls; elementwise work is not counted, as in flops.py)
  t_comm    = sum over collectives of bytes per device / link bandwidth, each a ring: a device
              sends and receives (k-1)/k of the gathered size (all-reduce: twice that)
  step      = t_compute + t_comm (no overlap) or max(t_compute, t_comm) (perfect overlap, what
              the asynchronous parallel linear aims for); MFU = useful FLOPs / (step x peak x devices)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh

from vit22b.config import ConfigError, ModelConfig
from vit22b.flops import flops_per_image
from vit22b.sharding import DATA, MODEL

GiB = 2**30
REMATS = ("nothing_saveable", "dots_saveable", "none")
HEADROOM = 0.9  # --search keeps plans whose peak is at most 90% of HBM
# Bytes per element on the wire. The step as XLA compiles it (the HLO of bench/plan_validate.py's
# steps on CPU) moves only f32: parameters are gathered before their cast to dtype_mm, and the
# residual stream and its cotangents cross the model axis in f32. Casting first would halve the
# all-gathers.
WIRE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes: float
    intra_bw: float  # bytes/s per device, one direction, inside a node (NVLink / ICI)
    inter_bw: float  # bytes/s per device, one direction, between nodes (InfiniBand / DCN)
    node_size: int  # devices that share the intra-node link


HARDWARE: dict[str, Hardware] = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM, 4096-chip pod on one 3-D ICI
    # torus. ICI: 400 Gb/s = 50 GB/s per link and direction (Jouppi et al., ISCA 2023); we charge
    # a ring one link (conservative: a torus axis can use both directions). One pod = one "node".
    "tpuv4": Hardware("tpuv4", 275e12, 32 * GiB, 50e9, 50e9, 4096),
    # NVIDIA A100 datasheet: 312 TFLOP/s dense bf16; NVLink3 600 GB/s total = 300 GB/s per
    # direction; 8 per HGX node; one 200 Gb/s HDR InfiniBand NIC per GPU = 25 GB/s.
    "a100": Hardware("a100", 312e12, 80 * GiB, 300e9, 25e9, 8),
    # H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 is with sparsity); NVLink4 900 GB/s total
    # = 450 GB/s per direction; one 400 Gb/s NDR NIC per GPU = 50 GB/s.
    "h100": Hardware("h100", 989e12, 80 * GiB, 450e9, 50e9, 8),
    # H200 SXM: the H100's compute and links with 141 GB of HBM3e (nvidia-smi: 143,771 MiB).
    "h200": Hardware("h200", 989e12, 140 * GiB, 450e9, 50e9, 8),
}


def state_layout(cfg: ModelConfig, optimizer: str, data: int, model: int) -> dict[str, Any]:
    """Per-device bytes of params and optimizer state from the trainer's shardings, and one
    record per parameter (for the collectives)."""
    return _state_layout(cfg.replace(remat="none"), optimizer, data, model)  # remat: no shapes


@functools.lru_cache(maxsize=64)
def _state_layout(cfg: ModelConfig, optimizer: str, data: int, model: int) -> dict[str, Any]:
    from vit22b.model import abstract_model, split_params
    from vit22b.optim import OptimConfig
    from vit22b.train import TrainConfig
    from vit22b.train_state import state_shardings

    mesh = AbstractMesh((data, model), (DATA, MODEL))
    tcfg = TrainConfig(model=cfg, optim=OptimConfig(optimizer=optimizer))  # type: ignore[arg-type]
    _, tx, shard = state_shardings(tcfg, mesh)
    _, params = split_params(abstract_model(cfg))
    opt = jax.eval_shape(tx.init, params)

    def nbytes(leaf: Any, sharding: Any) -> int:
        return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize

    records = []
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(shard["params"]), strict=True):
        records.append({"name": jax.tree_util.keystr(path), "bytes": nbytes(leaf, sh),
                        "over_data": DATA in sh.spec, "encoder": "encoder" in str(path[0])})
    opt_bytes = sum(nbytes(a, s) for a, s in zip(jax.tree.leaves(opt),
                                                 jax.tree.leaves(shard["opt_state"]), strict=True))
    return {"params": sum(r["bytes"] for r in records), "opt_state": opt_bytes, "records": records}


def check(cfg: ModelConfig, batch: int, data: int, model: int, grad_accum: int = 1) -> None:
    """The trainer's divisibility rules (sharding.check_divisibility), without devices."""
    if batch % (data * grad_accum):
        raise ConfigError(f"batch {batch} does not split into {data} data shards x {grad_accum} "
                          "micro-batches")
    for name in ("num_heads", "width", "mlp_dim"):
        if getattr(cfg, name) % model:
            raise ConfigError(f"{name} {getattr(cfg, name)} is not divisible by the model axis {model}")


def _dims(cfg: ModelConfig, b: int, m: int) -> dict[str, int]:
    H, hd, Mh = cfg.num_heads, cfg.head_dim, cfg.mlp_dim // cfg.num_heads
    return dict(b=b, T=cfg.num_tokens, D=cfg.width, Dm=cfg.width // m,
                Hm=H // m, hd=hd, Mh=Mh, F=3 * hd + Mh, Fo=hd + Mh, s=np.dtype(cfg.dtype_mm).itemsize)


def _kernels(d: dict[str, int]) -> int:
    """Elements of one layer's fused in- and out-kernels on one model device."""
    return d["D"] * d["Hm"] * d["F"] + d["Hm"] * d["Fo"] * d["D"]


def layer_residuals(cfg: ModelConfig, b: int, m: int) -> int:
    """Bytes of the residuals JAX's autodiff keeps for one block's backward pass (per device);
    the list `jax.ad_checkpoint.print_saved_residuals(parallel_block)` prints."""
    d = _dims(cfg, b, m)
    bT, s = d["b"] * d["T"], d["s"]
    return (bT * d["Dm"] * 4  # block input x
            + bT * d["D"] * (2 * 4 + s)  # RMSNorm: two f32 products over the gathered width, cast
            + _kernels(d) * s  # this layer's kernels, gathered and cast
            + bT * d["Hm"] * d["hd"] * (6 * 4 + 3 * s)  # q, k: split + 2 norm products; 3 casts
            + d["b"] * d["Hm"] * d["T"] ** 2 * (4 + s)  # softmax exp (f32) and probabilities
            + bT * d["Hm"] * d["Mh"] * 5 * 4  # MLP pre-activation and tanh-GELU intermediates
            + bT * d["Hm"] * d["Fo"] * s)  # concatenated input of the out-projection


def layer_working(cfg: ModelConfig, b: int, m: int, remat: str) -> int:
    """Bytes one block needs during its backward pass, beyond what was saved. XLA fuses the
    elementwise chains into their matmuls, so what is materialised is the matmuls' operands and
    results (rebuilt by the recompute: all of them under nothing_saveable, the operands only under
    dots_saveable) and their cotangents, plus the layer's gathered kernels and their f32 gradients
    before the reduce-scatter."""
    d = _dims(cfg, b, m)
    bT, s, logits = d["b"] * d["T"], d["s"], d["b"] * d["Hm"] * d["T"] ** 2
    operands = bT * d["D"] * s + bT * d["Hm"] * (3 * d["hd"] + d["Fo"]) * s + logits * s
    results = bT * d["D"] * 4 + bT * d["Hm"] * (d["F"] * 4 + d["hd"] * s) + logits * 4
    # cotangents: fused (f32) and z (cast); probabilities (f32), their cotangent (dtype_mm, from
    # the p.v matmul) and the logits' (f32); the block input's partial sums (f32)
    backward = (bT * d["Hm"] * (d["F"] * 4 + d["Fo"] * s) + logits * (4 + s + 4)
                + bT * d["D"] * 4)
    recompute = {"nothing_saveable": operands + results, "dots_saveable": operands}.get(remat, 0)
    return recompute + backward + _kernels(d) * (s + 4)


def saved_per_layer(cfg: ModelConfig, b: int, m: int, remat: str) -> int:
    d = _dims(cfg, b, m)
    bT = d["b"] * d["T"]
    carry = bT * d["Dm"] * 4
    if remat == "nothing_saveable":
        return carry
    if remat == "dots_saveable":
        return (carry + bT * d["Hm"] * d["F"] * 4 + d["b"] * d["Hm"] * d["T"] ** 2 * 4
                + bT * d["Hm"] * d["hd"] * d["s"] + bT * d["Dm"] * 4)
    if remat == "none":
        return layer_residuals(cfg, b, m)
    raise ConfigError(f"remat {remat!r}: the planner knows {REMATS}")


def teacher_forward(teacher: ModelConfig, b: int, m: int) -> int:
    """Bytes of a frozen teacher's forward at its peak, one layer's in-projection: the carry in
    and out, the layer's in-kernel gathered over data (f32, and its dtype_mm cast), the normalised
    input gathered over the model axis (f32 and cast) and the fused projection's f32 output.
    Nothing is saved for a backward pass."""
    d = _dims(teacher, b, m)
    bT, s = d["b"] * d["T"], d["s"]
    return (2 * bT * d["Dm"] * 4 + d["D"] * d["Hm"] * d["F"] * (4 + s) + bT * d["D"] * (4 + s)
            + bT * d["Hm"] * d["F"] * 4)


def memory(cfg: ModelConfig, batch: int, data: int, model: int, remat: str = "nothing_saveable",
           optimizer: str = "adafactor", grad_accum: int = 1,
           teacher: ModelConfig | None = None) -> dict[str, float]:
    """Per-device bytes (see the module docstring for the formulas); `teacher`: a distillation
    step's frozen teacher (as it runs: dtype_mm set), whose f32 params are an input of the step."""
    check(cfg, batch, data, model, grad_accum)
    st = state_layout(cfg, optimizer, data, model)
    b = batch // (data * grad_accum)
    inputs = batch // data * (cfg.image_size**2 * cfg.in_channels * 4 + 4)
    # grad_accum > 1: the scan over micro-batches holds its carry twice (old and new) beside the
    # micro-batch's gradients, and a reshaped copy of the batch
    grads = st["params"] * (3 if grad_accum > 1 else 1) + (inputs if grad_accum > 1 else 0)
    saved = cfg.depth * saved_per_layer(cfg, b, model, remat)
    working = layer_working(cfg, b, model, remat)
    update = st["params"] + st["params"] + st["opt_state"]
    arguments = st["params"] + st["opt_state"] + inputs + 4  # + the int32 step counter
    temp = max(grads + saved + working, update)
    out = {"params": st["params"], "opt_state": st["opt_state"], "inputs": inputs}
    if teacher is not None:
        check(teacher, batch, data, model, grad_accum)
        out["teacher_params"] = state_layout(teacher, "sgd", data, model)["params"]
        out["teacher_forward"] = teacher_forward(teacher, b, model)
        arguments += out["teacher_params"]
        temp = max(temp, out["teacher_forward"])  # the teacher's temporaries are gone by then
    return {**out, "arguments": arguments, "grads": grads, "saved_activations": saved,
            "working_activations": working, "update_phase": update, "temp": temp,
            "peak": arguments + temp}


# remat="auto": the first policy in the platform's order whose planned peak fits in a share of a
# device's memory. Accelerators: least recompute first ("none" does no extra forward work,
# "dots_saveable" recomputes no matmuls). CPUs (README "Remat and unrolling"): "none" was no faster
# than nothing_saveable (1.03x the step time on a Zen 3, 1.12x on a Zen 4), dots_saveable 0.90x.
AUTO_REMAT_ORDER = {"cpu": ("dots_saveable", "nothing_saveable"),
                    "accelerator": ("none", "dots_saveable", "nothing_saveable")}
AUTO_REMAT_HEADROOM = 0.5  # the planner's peak is within 10% of XLA's; leave the rest to the data


def device_memory_bytes(device: Any) -> int | None:
    """One device's memory: the allocator's limit on accelerators, the host's total memory shared
    by its CPU devices; None where neither is known. Both are fixed properties of the machine (not
    what happens to be free), so every process of a run on like hosts plans the same step without
    a collective."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text().split("\n")
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return None
        return kib * 1024 // max(1, jax.local_device_count())
    return None


def auto_remat(cfg: ModelConfig, batch: int, data: int, model: int, device_bytes: int | None,
               optimizer: str = "adafactor", grad_accum: int = 1, teacher: ModelConfig | None = None,
               platform: str = "gpu") -> tuple[str, dict[str, float]]:
    """remat="auto" resolved for a run: (policy, {policy: planned peak bytes}). The first of the
    platform's AUTO_REMAT_ORDER whose peak is at most AUTO_REMAT_HEADROOM of `device_bytes`; the
    most frugal (nothing_saveable) when none fits or the memory is unknown."""
    peaks: dict[str, float] = {}
    for remat in AUTO_REMAT_ORDER["cpu" if platform == "cpu" else "accelerator"]:
        peaks[remat] = memory(cfg, batch, data, model, remat, optimizer, grad_accum, teacher)["peak"]
        if device_bytes is not None and peaks[remat] <= AUTO_REMAT_HEADROOM * device_bytes:
            return remat, peaks
    return "nothing_saveable", peaks


def _bandwidth(hw: Hardware, axis_devices: int, stride: int) -> tuple[float, str]:
    """A ring over `axis_devices` devices spaced `stride` apart (model axis innermost)."""
    intra = axis_devices * stride <= hw.node_size
    return (hw.intra_bw, "intra") if intra else (hw.inter_bw, "inter")


def collectives(cfg: ModelConfig, batch: int, data: int, model: int, remat: str,
                optimizer: str, grad_accum: int, hw: Hardware,
                teacher: ModelConfig | None = None) -> list[dict[str, Any]]:
    """Bytes each device sends per step, per collective, and the time at its link's bandwidth."""
    st = state_layout(cfg, optimizer, data, model)
    s = WIRE_BYTES
    ring_d = (data - 1) / data
    recompute_gathers = 1 if remat in ("nothing_saveable", "dots_saveable") else 0
    # r["bytes"]: this device's f32 shard; a ring all-gather or reduce-scatter over data moves
    # (data-1) shards through each device, an all-reduce twice (data-1)/data of the tensor
    fsdp = sum(r["bytes"] // 4 * s * (data - 1) * (1 + (recompute_gathers if r["encoder"] else 0))
               for r in st["records"] if r["over_data"])
    reduce_scatter = sum(r["bytes"] // 4 * s * (data - 1) for r in st["records"] if r["over_data"])
    all_reduce = sum(2 * ring_d * r["bytes"] // 4 * s for r in st["records"] if not r["over_data"])
    b = batch // (data * grad_accum)
    full = b * cfg.num_tokens * cfg.width * (model - 1) / model
    # per layer: forward all-gather of the block input + reduce-scatter of the out-projection's
    # partial sums; backward: all-gather of the output cotangent + reduce-scatter of the input
    # cotangent; the recompute repeats the forward pair (nothing_saveable) or the gather (dots)
    per_layer = full * s * (4 + {"nothing_saveable": 2, "dots_saveable": 1}.get(remat, 0))
    d_bw, d_where = _bandwidth(hw, data, model)
    m_bw, m_where = _bandwidth(hw, model, 1)
    rows = [("fsdp_all_gather", DATA, fsdp * grad_accum, d_bw, d_where),
            ("grad_reduce_scatter", DATA, reduce_scatter * grad_accum, d_bw, d_where),
            ("grad_all_reduce", DATA, all_reduce * grad_accum, d_bw, d_where),
            ("model_activation_ag_rs", MODEL, per_layer * cfg.depth * grad_accum, m_bw, m_where)]
    if teacher is not None:  # forward only: its gathers over data, one pair per layer over model
        t_records = state_layout(teacher, "sgd", data, model)["records"]
        t_fsdp = sum(r["bytes"] // 4 * s * (data - 1) for r in t_records if r["over_data"])
        t_full = b * teacher.num_tokens * teacher.width * (model - 1) / model
        rows += [("teacher_fsdp_all_gather", DATA, t_fsdp * grad_accum, d_bw, d_where),
                 ("teacher_activation_ag_rs", MODEL, 2 * t_full * s * teacher.depth * grad_accum,
                  m_bw, m_where)]
    return [{"name": n, "axis": a, "bytes": float(by), "bandwidth": bw, "link": w,
             "seconds": by / bw} for n, a, by, bw, w in rows if by > 0]


def plan(cfg: ModelConfig, batch: int, data: int, model: int, hw: Hardware,
         remat: str = "nothing_saveable", optimizer: str = "adafactor",
         grad_accum: int = 1, teacher: ModelConfig | None = None) -> dict[str, Any]:
    """Memory, FLOPs, collectives and the predicted step time / MFU of one configuration;
    `teacher`: of a distillation step (its forward counts as useful work)."""
    check(cfg, batch, data, model, grad_accum)
    cfg = cfg.replace(remat=remat)
    devices = data * model
    f = flops_per_image(cfg)
    useful = (f["train"] + (flops_per_image(teacher)["forward"] if teacher else 0)) * batch
    recompute = f["encoder"] * batch if remat == "nothing_saveable" else 0
    t_compute = (useful + recompute) / devices / hw.peak_flops
    comm = collectives(cfg, batch, data, model, remat, optimizer, grad_accum, hw, teacher)
    t_comm = sum(c["seconds"] for c in comm)
    mem = memory(cfg, batch, data, model, remat, optimizer, grad_accum, teacher)
    tokens = batch * cfg.num_tokens
    out: dict[str, Any] = {
        "config": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.num_heads,
                   "mlp_dim": cfg.mlp_dim, "patch": cfg.patch_size, "image_size": cfg.image_size},
        "batch": batch, "mesh": f"{data}x{model}", "devices": devices, "remat": remat,
        "optimizer": optimizer, "grad_accum": grad_accum, "hardware": dataclasses.asdict(hw),
        "memory_bytes": mem, "fits": mem["peak"] <= HEADROOM * hw.hbm_bytes,
        "flops": {"useful": useful, "remat_recompute": recompute,
                  "per_device": (useful + recompute) / devices},
        "collectives": comm, "t_compute": t_compute, "t_comm": t_comm}
    if teacher is not None:
        out["teacher"] = {"width": teacher.width, "depth": teacher.depth, "patch": teacher.patch_size,
                          "image_size": teacher.image_size, "dtype_mm": teacher.dtype_mm}
    for mode, step in (("no_overlap", t_compute + t_comm), ("overlap", max(t_compute, t_comm))):
        out[mode] = {"step_seconds": step, "mfu": useful / (step * hw.peak_flops * devices),
                     "tokens_per_second_per_device": tokens / step / devices}
    return out


def search(cfg: ModelConfig, batch: int, devices: int, hw: Hardware, optimizer: str = "adafactor",
           remats: tuple[str, ...] = REMATS) -> list[dict[str, Any]]:
    """Every data x model mesh (model a power of two dividing heads, width and mlp_dim), remat
    policy and power-of-two grad_accum (the smallest that fits) that fits in HBM with headroom,
    best predicted MFU (with overlap, then without) first."""
    found = []
    m = 1
    while m <= devices:
        ok = devices % m == 0 and all(x % m == 0 for x in (cfg.num_heads, cfg.width, cfg.mlp_dim))
        if ok and batch % (devices // m) == 0:
            data = devices // m
            for remat in remats:
                accum = 1
                while batch % (data * accum) == 0:
                    p = plan(cfg, batch, data, m, hw, remat, optimizer, accum)
                    if p["fits"]:
                        found.append(p)
                        break
                    accum *= 2
        m *= 2
    # ties (compute-bound under overlap) go to the plan that loses least without overlap
    return sorted(found, key=lambda p: (-round(p["overlap"]["mfu"], 4), -p["no_overlap"]["mfu"]))
