"""Which of XLA's CPU dot/fusion runtimes (Eigen, oneDNN, XNNPACK, YNNPACK) is fastest here?

    python bench/xla_cpu_flags.py --preset S/16:224 --batch 8 --out bench/results/xla_cpu_flags.json

XLA's CPU backend in this jaxlib has debug options that route dots (and fusions around them) to
vendor libraries instead of its default Eigen/codegen path; `strings libjax_common.so | grep
xla_cpu_` lists them. Each option set here is passed per executable (`.lower().compile(options)`,
the same mechanism as `jax.jit(compiler_options=...)`), so all of them live in ONE process and
are timed round-robin (`common.time_interleaved`) against the default; XLA_FLAGS would need a
process each and a quiet machine for each. Measured: a square bf16->f32 and f32 matmul, the
forward pass and the full training step of one preset (the trainer's own step, donated state).
Every output is also compared with the default's (max |difference|), since a faster wrong
answer is no option.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import (
    command_line,
    hardware,
    hardware_line,
    loadavg,
    markdown_table,
    refuse_if_invalid,
    time_interleaved,
    write_json,
)
from vit22b.config import preset
from vit22b.flops import flops_per_image
from vit22b.model import apply, init_model, split_params
from vit22b.train import TrainConfig, make_train_step
from vit22b.train_state import init_state

DOT = "LIBRARY_FUSION_TYPE_DOT"
OPTION_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "onednn": {"xla_cpu_use_onednn": True},
    "onednn fusion dot": {"xla_cpu_experimental_onednn_fusion_type": DOT},
    "xnn fusion dot": {"xla_cpu_experimental_xnn_fusion_type": DOT},
    "ynn fusion dot": {"xla_cpu_experimental_ynn_fusion_type": DOT},
    "xnn graph greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "fast math": {"xla_cpu_enable_fast_math": True},
    # LLVM's optimisation level for XLA's generated code (default 3): compile time against speed
    "llvm O2": {"xla_backend_optimization_level": 2},
    "llvm O1": {"xla_backend_optimization_level": 1},
}


def compile_all(
    fn: Any, args: tuple[Any, ...], names: list[str], donate: bool = False, what: str = ""
) -> tuple[dict[str, Any], dict[str, str]]:
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    lowered = jitted.lower(*args)
    return compile_lowered(lowered, names, what)


COMPILE_SECONDS: dict[str, dict[str, float]] = {}  # what -> option set -> seconds, for the report
INIT_MAX_ABS_DIFF: dict[str, float] = {}  # option set -> max |initial parameters - default's|


def compile_lowered(lowered: Any, names: list[str], what: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    compiled, errors = {}, {}
    for name in names:
        try:
            t0 = time.perf_counter()
            compiled[name] = lowered.compile(OPTION_SETS[name])
            COMPILE_SECONDS.setdefault(what, {})[name] = time.perf_counter() - t0
        except Exception as e:  # an option this jaxlib does not know, or cannot apply
            errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return compiled, errors


def bench_matmul(n: int, dtype: Any, acc: Any, names: list[str], steps: int) -> dict[str, Any]:
    a, b = (
        jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in jax.random.split(jax.random.key(0))
    )
    compiled, errors = compile_all(lambda a, b: jnp.matmul(a, b, preferred_element_type=acc), (a, b), names,
                                   what=f"matmul {n} {jnp.dtype(dtype).name}")
    reference = np.asarray(compiled["default"](a, b), np.float32)
    diffs = {k: float(np.abs(np.asarray(f(a, b), np.float32) - reference).max()) for k, f in compiled.items()}
    loads: dict[str, Any] = {}
    times = time_interleaved(
        {k: (lambda f=f: f(a, b).block_until_ready()) for k, f in compiled.items()}, steps, loads=loads
    )
    return {"flops": 2 * n**3, "times": times, "loads": loads, "max_abs_diff": diffs, "errors": errors}


def bench_model(spec: str, batch: int, names: list[str], steps: int) -> dict[str, dict[str, Any]]:
    name, _, image = spec.partition(":")
    cfg = preset(name, **({"image_size": int(image)} if image else {}))
    tcfg = TrainConfig(model=cfg, batch_size=batch, progress=False)
    graphdef, tx, state, _ = init_state(tcfg)
    # the parameter initialisation: compile time, and the parameters must be bit-identical
    inits, _ = compile_lowered(jax.jit(lambda: split_params(init_model(cfg, seed=0))[1]).lower(), names,
                               f"{spec} init")
    ref = jax.tree.leaves(inits["default"]())
    for k, f in inits.items():
        leaves = zip(jax.tree.leaves(f()), ref, strict=True)
        diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in leaves]
        INIT_MAX_ABS_DIFF[k] = float(max(diffs))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels), np.float32))
    y = jnp.asarray(rng.integers(0, cfg.num_classes, batch, dtype=np.int32))
    fwd, fwd_err = compile_all(lambda p, x: apply(graphdef, p, x)[0], (state["params"], x), names,
                               what=f"{spec} b{batch} forward")
    ref = np.asarray(fwd["default"](state["params"], x))
    fwd_diff = {k: float(np.abs(np.asarray(f(state["params"], x)) - ref).max()) for k, f in fwd.items()}
    fwd_loads: dict[str, Any] = {}
    fwd_times = time_interleaved(
        {k: (lambda f=f: f(state["params"], x).block_until_ready()) for k, f in fwd.items()}, steps,
        loads=fwd_loads,
    )

    step_fn = make_train_step(graphdef, tx, tcfg)  # a jax.jit with the state donated
    lowered = step_fn.lower(state, {"image": x, "label": y})
    steps_compiled, step_err = compile_lowered(lowered, names, f"{spec} b{batch} train_step")
    states = {k: jax.tree.map(jnp.copy, state) for k in steps_compiled}
    losses: dict[str, float] = {}

    def runner(k: str):
        def run() -> None:
            states[k], metrics = steps_compiled[k](states[k], {"image": x, "label": y})
            losses[k] = float(metrics["loss"])

        return run

    for k in steps_compiled:  # first step from the same state: the losses must agree
        runner(k)()
    first_loss = dict(losses)
    step_loads: dict[str, Any] = {}
    step_times = time_interleaved({k: runner(k) for k in steps_compiled}, steps, loads=step_loads)
    flops = flops_per_image(cfg)
    return {
        "forward": {
            "flops": flops["forward"] * batch,
            "times": fwd_times,
            "loads": fwd_loads,
            "max_abs_diff": fwd_diff,
            "errors": fwd_err,
        },
        "train_step": {
            "flops": flops["train"] * batch,
            "times": step_times,
            "loads": step_loads,
            "errors": step_err,
            "first_loss": first_loss,
        },
    }


def survives(spec: str, batch: int, name: str) -> str | None:
    """None if the option set compiles and runs the model in a child process, else why not: some
    (YNNPACK fusions in this jaxlib) abort the whole process with an XLA check failure."""
    cmd = [
        sys.executable,
        __file__,
        "--preset",
        spec,
        "--batch",
        str(batch),
        "--steps",
        "1",
        "--options",
        name,
        "--probe-only",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if "Check failed" in ln or "Error" in ln]
    return f"exit {proc.returncode}: " + (lines[0].strip()[:200] if lines else proc.stderr[-200:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="S/16:224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--options", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    ap.add_argument("--out", default="bench/results/xla_cpu_flags.json")
    ap.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = ["default", *[n for n in args.options if n != "default"]]
    if args.probe_only:  # the child of `survives`
        bench_model(args.preset, args.batch, names, 1)
        return
    hw = hardware()
    print(hardware_line(hw), flush=True)
    results: dict[str, Any] = {}
    for label, dtype, acc in (
        ("matmul bf16->f32", jnp.bfloat16, jnp.float32),
        ("matmul f32", jnp.float32, None),
    ):
        print(f"  {label} {args.matmul_size}", flush=True)
        results[label] = bench_matmul(args.matmul_size, dtype, acc, names, args.steps)
    crashed = {n: why for n in names[1:] if (why := survives(args.preset, args.batch, n))}
    for n, why in crashed.items():
        print(f"  {n}: the model does not run with it ({why})", flush=True)
    print(f"  {args.preset} batch {args.batch}: forward and train step", flush=True)
    safe = [n for n in names if n not in crashed]
    results.update(
        {
            f"{args.preset} b{args.batch} {k}": {**v, "errors": {**v["errors"], **crashed}}
            for k, v in bench_model(args.preset, args.batch, safe, args.steps).items()
        }
    )

    table = []
    for what, res in results.items():
        base = statistics.median(res["times"]["default"])
        for k, times in res["times"].items():
            med = statistics.median(times)
            res.setdefault("summary", {})[k] = {
                "ms": 1e3 * med,
                "tflops": res["flops"] / med / 1e12,
                "speedup_vs_default": base / med,
            }
            extra = (
                f"{res['max_abs_diff'][k]:.1e}"
                if "max_abs_diff" in res
                else f"loss {res['first_loss'][k]:.4f}"
            )
            table.append(
                [what, k, f"{1e3 * med:.1f}", f"{res['flops'] / med / 1e12:.3f}", f"{base / med:.2f}x", extra]
            )
        table += [[what, k, "error", "", "", err[:60]] for k, err in res["errors"].items()]
    write_json(
        Path(args.out),
        {
            "command": command_line("bench/xla_cpu_flags.py", argv),
            "hardware": hw,
            "option_sets": {k: OPTION_SETS[k] for k in names},
            "results": results,
            "compile_seconds": COMPILE_SECONDS,
            "init_max_abs_diff": INIT_MAX_ABS_DIFF,
            "loadavg_at_end": loadavg(),
            "valid": all(v["valid"] for res in results.values() for v in res["loads"].values()),
        },
    )
    if refuse_if_invalid([v for res in results.values() for v in res["loads"].values()], args.out):
        return
    print(
        "\n"
        + markdown_table(
            ["what", "options", "ms (median)", "TFLOP/s", "vs default", "max |diff| / loss"], table
        )
    )
    print(f"\ninitial parameters, max |diff| from the default's: {INIT_MAX_ABS_DIFF}")
    print("\ncompile seconds\n" + markdown_table(
        ["what", *names], [[what, *(f"{secs[n]:.2f}" if n in secs else "" for n in names)]
                           for what, secs in COMPILE_SECONDS.items()]))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
