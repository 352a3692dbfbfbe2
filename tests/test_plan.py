"""`vit22b plan`: sharded state sizes against a real sharded init, the roofline's arithmetic,
the search's HBM filter, the activation formulas against XLA, and the CLI entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import pytest

from vit22b.compiled_step import step_memory
from vit22b.config import ConfigError, preset
from vit22b.optim import OptimConfig
from vit22b.plan import (
    AUTO_REMAT_HEADROOM,
    AUTO_REMAT_ORDER,
    HARDWARE,
    HEADROOM,
    GiB,
    auto_remat,
    device_memory_bytes,
    memory,
    plan,
    search,
    state_layout,
)
from vit22b.plan_cli import add_plan_parser
from vit22b.sharding import make_mesh
from vit22b.train import TrainConfig
from vit22b.train_state import init_state

# depth 2 makes the fused in-kernel (8 MB) exceed the 4 MiB FSDP threshold, so both the model and
# the data axis shard it; the out-kernel (6 MB) too; the head and norms stay replicated.
SMALL = preset("S/16", depth=2, image_size=32, num_classes=10)


def _device0_bytes(tree: object) -> int:
    return sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(tree)
               if hasattr(a, "addressable_shards"))


@pytest.mark.parametrize("optimizer", ["adafactor", pytest.param("adamw", marks=pytest.mark.slow)])
def test_state_bytes_match_a_real_sharded_init(optimizer: str) -> None:
    cfg = TrainConfig(model=SMALL, optim=OptimConfig(optimizer=optimizer), mesh="4x2")
    _, _, state, _ = init_state(cfg, make_mesh("4x2"))
    layout = state_layout(SMALL, optimizer, 4, 2)
    assert layout["params"] == _device0_bytes(state["params"])
    assert layout["opt_state"] == _device0_bytes(state["opt_state"])
    assert any(r["over_data"] for r in layout["records"])  # FSDP really is exercised
    # the same rules on a mesh far larger than this machine's
    big = state_layout(preset("22B/14"), optimizer, 256, 16)
    assert 21.7e9 * 4 / 4096 < big["params"] < 21.8e9 * 4 / 4096 * 1.25  # + replicated smalls


def test_mfu_and_overlap_arithmetic() -> None:
    cfg = preset("22B/14")
    for hw in HARDWARE.values():
        for mesh in ((256, 16), (1024, 4), (4096, 1)):
            p = plan(cfg, 65536, *mesh, hw)
            assert p["overlap"]["step_seconds"] <= p["no_overlap"]["step_seconds"]
            for mode in ("overlap", "no_overlap"):
                r = p[mode]
                # the paper's own conversion, independent of this code: 54.9% MFU is 1.15k tokens/s
                # per TPUv4 chip (275 TFLOP/s) for 22B/14; MFU / throughput is the same for any
                # plan, up to the 0.4% by which flops.py's count differs from the paper's
                per_token = 0.549 / 1150 * HARDWARE["tpuv4"].peak_flops / hw.peak_flops
                assert r["mfu"] / r["tokens_per_second_per_device"] == pytest.approx(per_token, rel=0.005)
            assert p["t_comm"] == pytest.approx(sum(c["seconds"] for c in p["collectives"]))
    # a pure data-parallel mesh has no model-axis traffic; one device has no traffic at all
    assert {c["axis"] for c in plan(cfg, 4096, 4096, 1, HARDWARE["tpuv4"])["collectives"]} == {"data"}
    solo = plan(preset("B/16"), 32, 1, 1, HARDWARE["h100"])
    assert solo["collectives"] == [] and solo["overlap"]["mfu"] == pytest.approx(0.75, abs=0.01)


def test_plan_rejects_meshes_the_trainer_rejects() -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        plan(preset("B/16"), 64, 1, 8, HARDWARE["h100"])
    with pytest.raises(ConfigError, match="batch"):
        plan(preset("B/16"), 60, 8, 1, HARDWARE["h100"])


def test_search_respects_hbm() -> None:
    cfg, hw = preset("22B/14"), HARDWARE["h100"]
    found = search(cfg, 65536, 256, hw)
    assert found and all(p["memory_bytes"]["peak"] <= HEADROOM * hw.hbm_bytes for p in found)
    mfus = [p["overlap"]["mfu"] for p in found]
    assert mfus == sorted(mfus, reverse=True)
    assert all(p["devices"] == 256 for p in found)
    # the parameters alone (sharded over 256 devices) need more than 0.1 GiB: nothing fits
    assert search(cfg, 65536, 256, dataclasses.replace(hw, hbm_bytes=0.1 * GiB)) == []


def test_memory_close_to_xla_memory_analysis() -> None:
    """bench/plan_validate.py measured |peak error| <= 12% on B/16 ... 22B/14; allow 25% here.
    The planner models accelerators, where attention="auto" is dot_product_attention ("xla"); on
    CPU auto is heads-major, whose step needed 17.2 MB of temporaries here against the planned
    21.6 (26% over), so the attention form is pinned to what the plan describes."""
    cfg = preset("S/16", depth=2, image_size=64, attention="xla", remat="nothing_saveable")
    xla = step_memory(TrainConfig(model=cfg, batch_size=32, mesh="4x2"), make_mesh("4x2"))
    args, temp = xla["arguments"], xla["temp"]
    planned = memory(cfg, 32, 4, 2)
    # params + optimizer state + batch, exact up to XLA dropping unused arguments: Adafactor keeps a
    # 4-byte placeholder v_row/v_col for each un-factored parameter that the step passes through
    # untouched, and XLA leaves those out of argument_size_in_bytes.
    assert 0 <= planned["arguments"] - args <= 8 * 64
    assert planned["temp"] == pytest.approx(temp, rel=0.25)
    assert planned["peak"] == pytest.approx(args + temp, rel=0.25)


def test_auto_remat_takes_the_platforms_first_policy_that_fits_and_xla_agrees() -> None:
    """remat="auto": for device memories just above each policy's planned peak (over the
    headroom), the platform's first policy that fits (accelerators: least recompute first; CPUs
    skip "none", which measured no faster there); XLA's own figure for the chosen step stays
    inside the memory it was chosen for."""
    cfg = preset("S/16", depth=2, image_size=64, attention="xla")
    peaks = {r: memory(cfg, 32, 1, 1, r)["peak"] for r in AUTO_REMAT_ORDER["accelerator"]}
    assert peaks["none"] > peaks["dots_saveable"] > peaks["nothing_saveable"]
    for fits, on_gpu, on_cpu in [("none", "none", "dots_saveable"),
                                 ("dots_saveable", "dots_saveable", "dots_saveable"),
                                 ("nothing_saveable", "nothing_saveable", "nothing_saveable")]:
        device_bytes = int(peaks[fits] / AUTO_REMAT_HEADROOM) + 1
        assert auto_remat(cfg, 32, 1, 1, device_bytes, platform="gpu")[0] == on_gpu
        assert auto_remat(cfg, 32, 1, 1, device_bytes, platform="cpu")[0] == on_cpu
    assert auto_remat(cfg, 32, 1, 1, 1)[0] == "nothing_saveable"  # nothing fits: the most frugal
    assert auto_remat(cfg, 32, 1, 1, None)[0] == "nothing_saveable"  # memory unknown
    device_bytes = int(peaks["dots_saveable"] / AUTO_REMAT_HEADROOM) + 1
    chosen = cfg.replace(remat=auto_remat(cfg, 32, 1, 1, device_bytes)[0])
    xla = step_memory(TrainConfig(model=chosen, batch_size=32, mesh="1x1"), make_mesh("1x1"))
    assert xla["arguments"] + xla["temp"] <= device_bytes
    host = device_memory_bytes(jax.devices()[0])  # CPU: MemTotal, shared by the host devices
    assert host is not None and host > 0


@pytest.mark.slow
def test_distill_22b_into_b16_memory_within_10_percent_of_xla() -> None:
    """The paper's distillation (ViT-22B/14 teacher -> B/16 student), planned before a cluster is
    booked: the real step (`make_train_step` with the distillation objective and the teacher as a
    frozen sharded input) compiled abstractly on a 2x4 mesh of simulated devices; `plan`'s
    per-device peak within 10% of XLA's arguments + temporaries (measured +0.3% on 4x4)."""
    student = preset("B/16", image_size=224, num_classes=1000)
    teacher = preset("22B/14", image_size=224, num_classes=1000, dtype_mm="bfloat16", remat="none")
    batch, mesh = 32, make_mesh("2x4")
    cfg = TrainConfig(model=student, batch_size=batch, mesh="2x4", teacher="<abstract>",
                      loss="softmax")
    xla = step_memory(cfg, mesh, teacher=teacher)
    planned = memory(student, batch, 2, 4, teacher=teacher)
    assert planned["arguments"] == pytest.approx(xla["arguments"], rel=1e-3)
    assert planned["peak"] == pytest.approx(xla["arguments"] + xla["temp"], rel=0.10)


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="vit22b")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", "22B/14", "--batch", "65536", "--mesh", "256x16",
                              "--hardware", "tpuv4", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == "256x16" and out["devices"] == 4096 and out["batch"] == 65536
    assert out["fits"] and 0 < out["overlap"]["mfu"] <= 1
    args = parser.parse_args(["plan", "22B/14", "--hardware", "h200", "--search", "64", "--top", "3"])
    assert args.func(args) == 0
    assert "best by MFU" in capsys.readouterr().out
