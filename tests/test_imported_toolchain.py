"""The whole toolchain on a model imported from timm: a sequential-block, class-token ViT (the
AugReg golden of tests/data/timm_vit/, 64 wide, 4 heads, 32 px, patches of 8) trains on a 4x2 mesh,
fine-tunes, distills, is probed, few-shot evaluated, LiT-tuned and planned."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from conftest import run_task
from vit22b.api import import_weights, load_model
from vit22b.cli import main
from vit22b.config import ConfigError
from vit22b.model import abstract_model, apply, logical_axes, split_params
from vit22b.objectives import classification_loss
from vit22b.optim import OptimConfig
from vit22b.sharding import make_mesh, param_spec
from vit22b.tasks import distill, fewshot, finetune, lit, probe
from vit22b.train import TrainConfig, make_train_step, to_global
from vit22b.train_state import init_state
from vit22b.weights import flatten

# One worker builds this module's trained fixture once (pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("imported_model")

GOLDEN = Path(__file__).parent / "data" / "timm_vit" / "augreg.safetensors"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "augreg"
    import_weights(GOLDEN, out, num_heads=4)
    return out


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    """3 classes of solid colours + noise, 10 images each, 32 px RGB."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / str(c)).mkdir()
        for i in range(10):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finetuned(imported, rgb_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "ft"
    assert run_task(finetune, ["--checkpoint", str(imported), "--data", str(rgb_folder), "--workdir",
                               str(out), "--steps", "4", "--batch-size", "8", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_trains_on_a_4x2_mesh(imported):
    """Loss and gradients on a 4x2 mesh equal one device's; heads and MLP units of the sequential
    kernels are split over the model axis; a real train step runs on the imported weights."""
    model = load_model(imported, dtype_mm="float32")  # f32 matmuls: the comparison is exact-ish
    cfg = model.cfg
    graphdef, params = split_params(model)
    mesh = make_mesh("4x2")
    tcfg = TrainConfig(model=cfg, optim=OptimConfig(warmup_steps=1), steps=2, batch_size=8, mesh="4x2")
    _, tx, state, shardings = init_state(tcfg, mesh)
    axes = flatten(logical_axes(abstract_model(cfg)))
    for name, want in {"encoder/qkv_kernel": P(None, None, "model", None),
                       "encoder/attn_out_kernel": P(None, "model", None, None),
                       "encoder/mlp_in_kernel": P(None, None, "model"),
                       "encoder/mlp_out_kernel": P(None, "model", None)}.items():
        assert flatten(state["params"])[name].sharding.spec == want == param_spec(
            axes[name], flatten(params)[name].shape, np.float32, mesh), name
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}

    def loss_fn(p, images, labels):
        return classification_loss(apply(graphdef, p, images)[0], labels, "sigmoid")

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    loss1, grads1 = grad_fn(params, batch["image"], batch["label"])
    sharded = jax.device_put(params, shardings["params"])
    with jax.set_mesh(mesh):
        data = jax.device_put(batch, NamedSharding(mesh, P("data")))
        loss8, grads8 = grad_fn(sharded, data["image"], data["label"])
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(g8, g1, rtol=2e-4, atol=2e-6)

    state = {**state, "params": sharded}
    step = make_train_step(graphdef, tx, tcfg, shardings, mesh)
    with jax.set_mesh(mesh):
        new, metrics = step.jitted(state, to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == 1


def test_collective_matmul_with_a_sequential_block_is_refused(imported, capsys):
    rc = main(["train", "--block", "sequential", "--collective-matmul", "--steps", "1", "--no-progress"])
    assert rc == 2
    assert "collective_matmul overlaps the parallel block's fused projections" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="drop collective_matmul or use block='parallel'"):
        load_model(imported, collective_matmul=True)


def test_finetune(finetuned):
    result = json.loads((finetuned / "finetune.json").read_text())
    assert result["steps"] == 4 and result["num_classes"] == 3 and result["source_num_classes"] == 10
    model = load_model(finetuned)
    assert (model.cfg.block, model.cfg.has_class_token, model.cfg.class_posemb) == ("sequential", True, True)


@pytest.mark.slow
def test_distill_from_the_imported_teacher(finetuned, rgb_folder, tmp_path):
    out = tmp_path / "student"
    assert run_task(distill, ["--teacher", str(finetuned), "--student-preset", "mu/8", "--data",
                              str(rgb_folder), "--workdir", str(out), "--steps", "3", "--batch-size", "8",
                              "--no-progress"]) == 0
    assert load_model(out).cfg.image_size == 32


@pytest.mark.parametrize("task, argv", [
    (probe, ["--steps", "20"]),
    (fewshot, ["--shots", "1", "2", "--seeds", "0"]),
    (lit, ["--steps", "3", "--batch-size", "8", "--text-width", "32", "--text-depth", "1",
           "--text-heads", "2", "--embed-dim", "16"]),
])
def test_frozen_feature_tasks(task, argv, imported, rgb_folder, tmp_path):
    name = task.__name__.rsplit(".", 1)[-1]
    extra = ["--workdir", str(tmp_path / "w")] if task is lit else []
    assert run_task(task, ["--checkpoint", str(imported), "--data", str(rgb_folder), "--out",
                           str(tmp_path / f"{name}.json"), "--no-progress", *argv, *extra]) == 0
    assert (tmp_path / f"{name}.json").exists()


def test_plan_handles_the_imported_model(imported, capsys):
    assert main(["plan", "--checkpoint", str(imported), "--batch", "64", "--mesh", "4x2",
                 "--hardware", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mesh"] == "4x2" and plan["config"]["width"] == 64 and plan["config"]["depth"] == 2
    assert plan["memory_bytes"]["params"] > 0
    assert main(["plan", "22B/14", "--checkpoint", str(imported)]) == 2  # one or the other


def test_initial_params_are_the_imported_weights_in_their_shards(imported):
    """`train --init`: the file's weights, posemb resampled to a new grid, a new zero head for new
    classes, each kernel built directly in its shards of a 4x2 mesh."""
    from vit22b.posemb import resample_posemb
    from vit22b.train_state import initial_params, state_shardings
    from vit22b.weights import read_config, read_weights

    cfg = read_config(imported).replace(image_size=48, num_classes=3, dtype_mm="float32")  # grid 4 -> 6
    tcfg = TrainConfig(model=cfg, mesh="4x2", steps=2)
    _, _, shardings = state_shardings(tcfg, make_mesh("4x2"))
    params = flatten(initial_params(str(imported), cfg, shardings["params"]))
    flat, _ = read_weights(imported)
    assert set(params) == set(flat)
    for name, value in params.items():
        if name == "pos_embedding":
            np.testing.assert_allclose(value, resample_posemb(flat[name], 6), rtol=1e-6, atol=1e-7)
        elif name in ("head_kernel", "head_bias"):
            assert value.shape[-1] == 3 and not np.any(np.asarray(value))
        else:
            np.testing.assert_array_equal(value, flat[name], err_msg=name)
    assert params["encoder/qkv_kernel"].sharding.spec == P(None, None, "model", None)


@pytest.mark.slow
def test_train_from_an_imported_model_on_a_mesh_equals_one_device(imported, rgb_folder, tmp_path, capsys):
    """`vit22b train --init` on a 4x2 mesh (kernels split over the model axis) ends with the same
    weights as on the 8-way data-parallel mesh, and it started from the imported weights."""
    from safetensors.numpy import load_file

    common = ["train", "--init", str(imported), "--data", str(rgb_folder), "--image-size", "32",
              "--steps", "2", "--batch-size", "8", "--loss", "softmax", "--optimizer", "adamw",
              "--lr", "1e-3", "--dtype-mm", "float32", "--data-workers", "0", "--no-progress"]
    assert main([*common, "--mesh", "4x2", "--workdir", str(tmp_path / "4x2")]) == 0
    assert "a new zero head for 3 classes" in capsys.readouterr().out
    assert main([*common, "--mesh", "-1x1", "--workdir", str(tmp_path / "8x1")]) == 0
    a, b = (load_file(str(tmp_path / w / "model.safetensors")) for w in ("4x2", "8x1"))
    start = load_file(str(imported / "model.safetensors"))
    for name in a:
        # Adam divides by sqrt(v): where a gradient is near zero, the meshes' different summation
        # orders reach the update at ~1e-6 (seen under remat=dots_saveable, auto's CPU choice)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=3e-6, err_msg=name)
    moved = np.abs(a["encoder/qkv_kernel"] - start["encoder/qkv_kernel"]).max()
    assert 0 < moved < 0.01, moved  # two AdamW steps of lr <= 1e-3 from the imported kernel
    capsys.readouterr()
    assert main([*common, "--preset", "S/16", "--workdir", str(tmp_path / "x")]) == 2
    assert "drop --preset" in capsys.readouterr().err and not (tmp_path / "x").exists()
