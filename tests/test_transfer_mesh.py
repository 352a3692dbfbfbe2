"""Fine-tuning and distillation run through `vit22b train`'s loop, so they shard, checkpoint and
resume like it: from the CLI with `--mesh`, on 8 simulated devices, against one device.

Each run is a `python -m vit22b.cli` child process: the device count is fixed when jax starts, so
the one-device reference and the 8-device meshes need processes of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FAST_COMPILE
from vit22b.config import preset
from vit22b.model import init_model, split_params
from vit22b.weights import save_model

EIGHT = "--xla_force_host_platform_device_count=8"
STEP_LINE = re.compile(r"^step (\d+)/\d+: loss")


def _env(devices_flag: str, cache: Path) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"{devices_flag} {FAST_COMPILE}", "PYTHONUNBUFFERED": "1",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run(args: list[str], env: dict[str, str], kill_at_step: int | None = None) -> tuple[int, str]:
    """Run `vit22b ARGS`; with `kill_at_step`, SIGKILL it when it prints that step's line."""
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: see test_faults.py
        proc = subprocess.Popen([sys.executable, "-m", "vit22b.cli", *args], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            m = STEP_LINE.match(line)
            if kill_at_step is not None and m and int(m.group(1)) == kill_at_step:
                proc.kill()
                break
        proc.communicate(timeout=600)
        err.seek(0)
        return proc.returncode, err.read()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mu/4 model (2 layers, 4 heads: the model axis of 4 splits them) at 8 px, 10 classes
    (initial weights: these tests compare runs, not skill)."""
    cfg = preset("mu/4", depth=2, num_heads=4, image_size=8, in_channels=1, num_classes=10,
                 dtype_mm="float32")
    path = tmp_path_factory.mktemp("source")
    save_model(path, split_params(init_model(cfg, seed=3))[1], cfg)
    return path


def _losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_distill_on_2x4_mesh_matches_one_device(source: Path, tmp_path: Path) -> None:
    """The teacher sharded on a 2x4 mesh (its heads and MLP over `model`, the batch over `data`)
    gives the one-device loss curve to rtol 1e-5. Teacher and student in float32: with bfloat16
    matmuls a different summation order can flip a rounding, which is not a sharding error."""
    args = ["distill", "--teacher", str(source), "--student-preset", "mu/2", "--num-heads", "4",
            "--data", "digits", "--image-size", "16", "--steps", "12", "--batch-size", "32",
            "--temperature", "2", "--label-weight", "0.25", "--teacher-dtype", "float32",
            "--dtype-mm", "float32", "--log-every", "1", "--eval-every", "0", "--no-progress"]
    curves = {}
    for name, flag, mesh in (("one", "", "1x1"), ("mesh", EIGHT, "2x4")):
        rc, err = _run([*args, "--mesh", mesh, "--workdir", str(tmp_path / name)],
                       _env(flag, tmp_path / f"cache-{name}"))
        assert rc == 0, err[-3000:]
        curves[name] = _losses(tmp_path / name)
        result = json.loads((tmp_path / name / "distill.json").read_text())
        assert result["mesh"] == mesh and result["teacher_dtype"] == "float32"
    assert len(curves["one"]) == 12
    np.testing.assert_allclose(curves["mesh"], curves["one"], rtol=1e-5)
    # the teacher's resolution (8 px) is not the student's (16 px): it saw the batch resized
    cfg = json.loads((tmp_path / "mesh" / "config.json").read_text())
    assert (cfg["image_size"], cfg["width"], cfg["depth"]) == (16, 32, 1)


@pytest.mark.slow
def test_finetune_on_4x2_killed_resumes_bit_identical(source: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run on a 4x2 mesh, then the same command: the weights equal an uninterrupted
    run's bit for bit (the batch of step s depends only on the seed and s)."""
    def args(workdir: Path) -> list[str]:
        return ["finetune", "--checkpoint", str(source), "--data", "digits", "--image-size", "16",
                "--steps", "16", "--batch-size", "32", "--checkpoint-every", "5", "--log-every", "1",
                "--mesh", "4x2", "--no-progress", "--workdir", str(workdir)]

    env = _env(EIGHT, tmp_path / "cache")
    rc, err = _run(args(tmp_path / "straight"), env)
    assert rc == 0, err[-3000:]
    rc, _ = _run(args(tmp_path / "killed"), env, kill_at_step=13)
    assert rc == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    rc, err = _run(args(tmp_path / "killed"), env)
    assert rc == 0, err[-3000:]
    resumed = json.loads((tmp_path / "killed" / "finetune.json").read_text())
    # orbax saves in the background: the kill may land before checkpoint 10 is complete
    assert resumed["resumed_from"] in (5, 10) and resumed["mesh"] == "4x2"
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and a["head_kernel"].shape == (32, 10)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
