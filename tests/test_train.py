"""The training loop: determinism, resume after SIGKILL, non-finite stop, gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from vit22b import objectives
from vit22b.config import preset
from vit22b.data import load_digits_dataset
from vit22b.optim import OptimConfig
from vit22b.sharding import make_mesh
from vit22b.train import TrainConfig, TrainingError, make_train_step, train
from vit22b.train_state import init_state

TINY = dict(image_size=8, in_channels=1, num_classes=10)


def tiny_config(workdir: Path, steps: int = 6, **kw) -> TrainConfig:
    fields = dict(model=preset("mu/4", **TINY), optim=OptimConfig(warmup_steps=2, cooldown_steps=2),
                  workdir=str(workdir), steps=steps, batch_size=32, checkpoint_every=3,
                  log_every=2, progress=False, mesh="1x1")
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def digits8():
    return load_digits_dataset(8)


def test_train_writes_results_and_learns(tmp_path, digits8):
    cfg = tiny_config(tmp_path, steps=30, loss="softmax",
                      optim=OptimConfig(learning_rate=3e-3, warmup_steps=3, cooldown_steps=5))
    result = train(cfg, digits8)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["steps"] == 30 and final["eval_examples"] == 360
    assert final["eval_accuracy"] == result["eval_accuracy"] > 0.2  # chance is 0.1
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text()
              .splitlines() if "train/loss" in line]
    assert losses[-1] < losses[0]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [24, 27, 30]
    assert (tmp_path / "model.safetensors").exists()
    assert list((tmp_path / "tb").iterdir())


def test_auto_remat_runs_the_planners_choice(tmp_path, digits8, capsys):
    """remat="auto" resolves once per run (a tiny model fits; on CPU the order starts with
    dots_saveable) and trains exactly as that policy given by hand; the run's record says which
    policy ran."""
    auto = tiny_config(tmp_path / "auto", model=preset("mu/4", **TINY, remat="auto"))
    train(auto, digits8)
    assert "remat auto -> dots_saveable" in capsys.readouterr().out
    record = json.loads((tmp_path / "auto" / "train_config.json").read_text())
    assert record["model"]["remat"] == "dots_saveable"
    train(tiny_config(tmp_path / "dots", model=auto.model.replace(remat="dots_saveable")), digits8)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("auto", "dots"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_step_compiles_once(tmp_path):
    cfg = tiny_config(tmp_path)
    mesh = make_mesh(cfg.mesh)
    graphdef, tx, state, shardings = init_state(cfg, mesh)
    step = make_train_step(graphdef, tx, cfg, shardings, mesh)
    batch = {"image": np.zeros((32, 8, 8, 1), np.float32), "label": np.zeros(32, np.int32)}
    for _ in range(3):
        state, _ = step(state, batch)
    assert step.jitted._cache_size() == 1  # a second trace would mean the state changed type


def test_step_reports_each_layers_largest_attention_logit(tmp_path):
    """With log_attention_logits, the step's metrics carry attn_logit_max/<layer> of the params it
    started from: the model's own attn_stats on the same batch (tested against numpy in
    test_encoder.py)."""
    from vit22b.model import apply

    cfg = tiny_config(tmp_path, model=preset("mu/4", depth=2, **TINY).replace(dtype_mm="float32"),
                      log_attention_logits=True)
    mesh = make_mesh(cfg.mesh)
    graphdef, tx, state, shardings = init_state(cfg, mesh)
    batch = {"image": np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype(np.float32),
             "label": np.arange(32, dtype=np.int32) % 10}
    _, want = apply(graphdef, jax.device_get(state["params"]), batch["image"], attn_stats=True)
    _, metrics = make_train_step(graphdef, tx, cfg, shardings, mesh)(state, batch)
    got = [float(metrics[f"attn_logit_max/{i}"]) for i in range(2)]
    np.testing.assert_allclose(got, np.asarray(want["attn_logit_max"]), rtol=1e-5)


def test_grad_accumulation_matches_full_batch(tmp_path):
    batch = {"image": np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype(np.float32),
             "label": np.arange(32, dtype=np.int32) % 10}
    outs = []
    for accum in (1, 4):
        cfg = tiny_config(tmp_path, grad_accum=accum, model=preset("mu/4", dtype_mm="float32", **TINY))
        mesh = make_mesh(cfg.mesh)
        graphdef, tx, state, shardings = init_state(cfg, mesh)
        state, metrics = make_train_step(graphdef, tx, cfg, shardings, mesh)(state, batch)
        outs.append((metrics["loss"], state["params"]))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, digits8, monkeypatch):
    train(tiny_config(tmp_path, steps=3), digits8)
    ckpt = tmp_path / "checkpoints" / "3"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    weights_before = load_file(tmp_path / "model.safetensors")

    real_loss = objectives.classification_loss
    monkeypatch.setattr(objectives, "classification_loss",
                        lambda logits, labels, *rest: real_loss(logits, labels, *rest) * jnp.nan)
    with pytest.raises(TrainingError, match="non-finite.*last good checkpoint is step 3"):
        train(tiny_config(tmp_path, steps=9), digits8)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    weights_after = load_file(tmp_path / "model.safetensors")
    assert all(np.array_equal(weights_before[k], weights_after[k]) for k in weights_before)


def test_workdir_of_another_config_is_refused(tmp_path, digits8):
    train(tiny_config(tmp_path, steps=3), digits8)
    other = tiny_config(tmp_path, steps=3, model=preset("mu/4", block="sequential", **TINY))
    with pytest.raises(TrainingError, match="another model config"):
        train(other, digits8)


def test_model_must_fit_data(tmp_path, digits8):
    with pytest.raises(TrainingError, match="does not fit the data"):
        train(tiny_config(tmp_path, model=preset("mu/4", image_size=8, in_channels=3,
                                                  num_classes=10)), digits8)


# SIGKILL at several moments, then resume to bit-identical weights: tests/test_faults.py.


def test_full_22b_train_state_shapes_abstractly():
    """Params + Adafactor state of the 22B preset, sharded 4x2, shaped without allocating."""
    cfg = TrainConfig(model=preset("22B/14", num_classes=1000), steps=10)
    _, _, state, _ = init_state(cfg, make_mesh("4x2"), abstract=True)
    params = sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    kernels = np.prod(state["params"]["encoder"]["in_kernel"].shape) + np.prod(
        state["params"]["encoder"]["out_kernel"].shape)
    assert kernels == 21_743_271_936 and params > kernels
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert state["params"]["encoder"]["in_kernel"].sharding.spec == P(None, "data", "model", None)
