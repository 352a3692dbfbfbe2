"""What every benchmark here shares: the hardware record, the measured matmul peak, interleaved
timing, and the markdown table.

A benchmark result means something only with its hardware, its command and how busy the machine
was, so every JSON stores all three (`hardware()`, `command_line()`, load averages).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib

Row = dict[str, Any]
# Matmul forms timed for the peak: (name, input dtype, preferred_element_type).
PEAK_FORMS = [
    ("bf16_f32acc", jnp.bfloat16, jnp.float32),
    ("f32", jnp.float32, None),
    ("bf16_bf16out", jnp.bfloat16, None),
]


def loadavg() -> tuple[float, ...] | None:
    """1/5/15-minute load average: on a shared machine, how busy the neighbours were."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def hardware() -> dict[str, Any]:
    dev, cpuinfo = jax.devices()[0], Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "cpu_matmul_isa": [f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_at_start": loadavg(),
    }


def hardware_line(hw: dict[str, Any]) -> str:
    return (
        f"{hw['device_kind']} x{hw['device_count']} ({hw['platform']}; {hw['cpu_count']} CPUs, "
        f"{hw['cpu_model']}, {' '.join(hw['cpu_matmul_isa']) or 'no AVX-512'}), jax {hw['jax']}, "
        f"load {hw['loadavg_at_start']}"
    )


def command_line(script: str, argv: Sequence[str] | None) -> str:
    return shlex.join(["python", *(sys.argv if argv is None else [script, *argv])])


def default_peak_sizes() -> list[int]:
    return [1024, 2048, 4096] if jax.devices()[0].platform == "cpu" else [4096, 8192, 16384]


def measure_peak(sizes: list[int], repeats: int, warmup: int = 2) -> dict[str, Any]:
    """TFLOP/s of jitted n x n @ n x n per form and size (median of `repeats`); best size per form."""
    result: dict[str, Any] = {"sizes": sizes, "repeats": repeats}
    for name, dtype, acc in PEAK_FORMS:
        mm = jax.jit(lambda a, b, acc=acc: jnp.matmul(a, b, preferred_element_type=acc))
        rates = {}
        for n in sizes:
            a, b = (
                jax.random.normal(k, (n, n), jnp.float32).astype(dtype)
                for k in jax.random.split(jax.random.key(n))
            )
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(mm(a, b))
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            rates[n] = 2 * n**3 / statistics.median(times) / 1e12
            del a, b
        best = max(rates, key=rates.__getitem__)
        result[name] = {"tflops_by_size": rates, "best_tflops": rates[best], "best_size": best}
    return result


def combine_peaks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each form's best over the runs; `peak_tflops` (bf16 in, f32 accumulate) is MFU's divisor."""
    best = {name: max(r[name]["best_tflops"] for r in runs) for name, _, _ in PEAK_FORMS}
    return {"runs": runs, "best_tflops": best, "peak_tflops": best["bf16_f32acc"]}


def peak_line(run: dict[str, Any]) -> str:
    forms = ", ".join(
        f"{name} {run[name]['best_tflops']:.3f} (n={run[name]['best_size']})" for name, _, _ in PEAK_FORMS
    )
    return f"peak matmul TFLOP/s, best of sizes {run['sizes']}: {forms}"


def load_valid(*loads: tuple[float, ...] | None) -> bool:
    """False when any 1-minute load average exceeded the core count: round-robin timing does not
    cancel such load (torch slowed 8-12x and XLA 3-4x at load 8-12 on 2 cores, flipping a 0.75x
    ratio into 2.3x), so a figure taken then is not reported as a result."""
    cores = os.cpu_count() or 1
    return not any(load is not None and load[0] > cores for load in loads)


def refuse_if_invalid(loads: Sequence[dict[str, Any]], out: Path | str) -> bool:
    """True when any contender's load record (`time_interleaved(loads=...)`) is invalid: then it
    says so, with the worst load, and the caller prints no summary table (the raw rows stay in
    the JSON, marked valid=false)."""
    bad = [entry for entry in loads if not entry.get("valid", True)]
    if not bad:
        return False
    worst = max(max(entry["load_before"], entry["load_after"]) for entry in bad)
    foreign = [entry["foreign_cores"] for entry in bad if entry.get("foreign_cores") is not None]
    others = f", other processes used {max(foreign):.2f} cores" if foreign else ""
    print(f"\nINVALID RUN: the load average reached {worst:.1f} on {os.cpu_count()} cores during "
          f"timing{others}; round-robin ratios are not trustworthy under such load, so no summary "
          f"table is printed (the raw rows are in {out}, marked valid=false). Rerun on a quiet machine.")
    return True


# Other processes' CPU use, in cores, below which a contender's timing counts as quiet even when the
# load average is above the core count: a benchmark that fills the cores puts the load average at
# about the core count by itself (XLA's and YNNPACK's worker threads), so the load alone would
# reject every such run on a quiet machine.
FOREIGN_CORES_MAX = 0.25


def cpu_busy_s() -> float | None:
    """CPU-seconds all cores have spent busy since boot (/proc/stat); None where it does not exist."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def time_interleaved(
    runners: dict[str, Callable[[], Any]], steps: int, pause_s: float = 0.05,
    loads: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of `steps` calls of each runner, taken round-robin (the starting runner rotates)
    so that a noisy neighbour slows every contender alike; each runner must block until done.
    The pause lets the other library's spinning worker threads go idle first. `loads`, if given,
    receives per runner the highest load average seen just before and just after its calls, the
    other processes' mean CPU use during its calls (`foreign_cores`: all CPU time minus this
    process's, over the wall time), and `valid`: the load stayed within the core count, or nothing
    else ran (foreign_cores <= FOREIGN_CORES_MAX)."""
    names, times = list(runners), {name: [] for name in runners}
    worst: dict[str, list[float]] = {name: [0.0, 0.0] for name in runners}
    foreign_s: dict[str, float | None] = {name: 0.0 for name in runners}
    for step in range(steps):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            time.sleep(pause_s)
            before, busy0, own0 = loadavg(), cpu_busy_s(), time.process_time()
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
            after, busy1, own1 = loadavg(), cpu_busy_s(), time.process_time()
            if before is not None and after is not None:
                worst[name] = [max(worst[name][0], before[0]), max(worst[name][1], after[0])]
            if busy0 is None or busy1 is None or foreign_s[name] is None:
                foreign_s[name] = None
            else:
                foreign_s[name] += max(0.0, (busy1 - busy0) - (own1 - own0))
    if loads is not None:
        for name, (before, after) in worst.items():
            fs = foreign_s[name]
            foreign = None if fs is None else fs / max(sum(times[name]), 1e-9)
            quiet = foreign is not None and foreign <= FOREIGN_CORES_MAX
            loads[name] = {"load_before": before, "load_after": after, "foreign_cores": foreign,
                           "valid": load_valid((before,), (after,)) or quiet}
    return times


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(ln[i]) for ln in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(ln, widths, strict=True)) + " |" for ln in lines]
    return "\n".join([text[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *text[1:]])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)


def train_step_runner(cfg: Any, batch: int, seed: int = 0) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The trainer's own step for `cfg` (default recipe, state donated, one device) on a fixed random
    batch: (a call that runs one step and blocks, {compile_s, memory bytes from XLA, params}).
    XLA's `memory_analysis` gives the executable's own footprint (arguments + outputs + temporaries
    - aliased), a per-config figure that the process's peak RSS cannot give."""
    import numpy as np

    from vit22b.train import TrainConfig, make_train_step
    from vit22b.train_state import init_state

    tcfg = TrainConfig(model=cfg, batch_size=batch, progress=False)
    graphdef, tx, state, _ = init_state(tcfg)
    rng = np.random.default_rng(seed)
    data = {
        "image": jnp.asarray(
            rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels), np.float32)
        ),
        "label": jnp.asarray(rng.integers(0, max(cfg.num_classes, 1), batch, dtype=np.int32)),
    }
    t0 = time.perf_counter()
    compiled = make_train_step(graphdef, tx, tcfg).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    info = {"compile_s": compile_s, "params": int(sum(x.size for x in jax.tree.leaves(state["params"])))}
    if mem is not None:
        info.update(
            argument_bytes=mem.argument_size_in_bytes,
            output_bytes=mem.output_size_in_bytes,
            temp_bytes=mem.temp_size_in_bytes,
            alias_bytes=mem.alias_size_in_bytes,
            total_bytes=mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes,
        )
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics)

    return run, info
