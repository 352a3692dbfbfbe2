"""Shared fixtures. XLA_FLAGS must be set before jax is first imported: sharding tests need 8
simulated CPU devices."""

import os

# LLVM at -O1 instead of -O3 in XLA's CPU backend: compiling is most of a tiny test's time, and -O1
# compiles about 20% faster end to end (bench/paper_in_miniature.py --quick: 171 -> 139 s). It
# changes only the machine code LLVM emits, not XLA's HLO passes (shardings, fusions, the
# collectives the HLO tests read). The tests that run the user's real configuration (the README's
# main command, the console-script runs) set their own XLA_FLAGS and keep -O3.
FAST_COMPILE = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vit22b.config import ModelConfig, preset  # noqa: E402
from vit22b.model import abstract_model, apply, split_params  # noqa: E402
from vit22b.weights import flatten, unflatten  # noqa: E402


def make_random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Params of the right shapes filled with numpy random values (much faster than the real
    initialiser, whose per-shape RNG kernels take seconds to compile on CPU). Everything is
    nonzero so that a misplaced scale, bias or transpose shows in the outputs: norm scales are
    1 + noise, biases small noise, kernels ~ N(0, 1/width) and the classifier is nonzero."""
    rng = np.random.default_rng(seed)
    _, abstract = split_params(abstract_model(cfg))
    flat = {}
    for name, leaf in flatten(abstract).items():
        shape = tuple(leaf.shape)
        noise = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("_scale"):
            value = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            value = 0.2 * noise
        elif name in ("pos_embedding", "map_head/probe", "cls_token"):
            value = 0.5 * noise
        else:
            value = noise / np.sqrt(cfg.width)
        flat[name] = jnp.asarray(value, jnp.float32)
    return unflatten(flat)


def make_forward(cfg: ModelConfig, **kwargs: Any) -> Callable[..., Any]:
    """jit-compiled (params, images) -> (logits, intermediates) for `cfg`."""
    graphdef, _ = split_params(abstract_model(cfg))
    return jax.jit(lambda params, images: apply(graphdef, params, images, **kwargs))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """width 32, 2 heads, mlp 128, depth 1, 4x4 grid of 4px patches, float32 matmuls."""
    return preset("mu/4", image_size=16, num_classes=10, dtype_mm="float32")


@pytest.fixture
def tiny2_cfg(tiny_cfg: ModelConfig) -> ModelConfig:
    """The tiny config with two blocks (so stacking, scan and per-layer outputs are exercised)."""
    return tiny_cfg.replace(depth=2)


@pytest.fixture
def images() -> np.ndarray:
    """A batch of 2 random 16x16 RGB images, NHWC."""
    return np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def random_params() -> Callable[..., dict[str, Any]]:
    return make_random_params


@pytest.fixture(scope="session")
def forward() -> Callable[..., Callable[..., Any]]:
    return make_forward


def shared_tmp(tmp_path_factory) -> Path:
    """This test run's temporary root, shared by its xdist workers (each has its own basetemp)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory):
    """mu/4 at 8 px trained 30 steps on digits in a one-device subprocess, once per test run (the
    xdist workers share it: the first one to take the lock trains it); the transfer-task tests
    (probe, few-shot, robustness, ...) run on it."""
    import fcntl
    import subprocess
    import sys

    root = shared_tmp(tmp_path_factory)
    path = root / "tasks_digits_ckpt"
    with open(root / "tasks_digits_ckpt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            subprocess.run([sys.executable, "-m", "vit22b.cli", "train", "--preset", "mu/4", "--image-size",
                            "8", "--steps", "30", "--batch-size", "64", "--no-progress",
                            "--workdir", str(path)],
                           env={**os.environ, "XLA_FLAGS": ""}, check=True, capture_output=True)
    return path


def run_task(module, argv: list[str]) -> int:
    """Run one vit22b.tasks sub-command as the CLI would: parse `argv`, call its func."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args([module.__name__.rsplit(".", 1)[-1], *argv])
    return args.func(args)


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the run (shared by the xdist workers): the many
    tests that train the same tiny configs compile each program once (compiling is most of a small
    test's time on CPU). Set through the environment too, so subprocesses use it."""
    cache = str(shared_tmp(tmp_path_factory) / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    yield
