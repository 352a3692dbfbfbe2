"""Multi-process training through jax.distributed: 2 local CPU processes x 2 devices on a 2x2
mesh give the same losses as 1 process with 4 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_COMPILE

COMMON = ["--preset", "mu/4", "--image-size", "8", "--steps", "6", "--batch-size", "16",
          "--mesh", "2x2", "--log-every", "1", "--checkpoint-every", "3", "--warmup", "2",
          "--cooldown", "2", "--no-progress"]


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    cli = [sys.executable, "-m", "vit22b.cli", "train", *COMMON]
    single = tmp_path / "single"
    subprocess.run([*cli, "--workdir", str(single)], env=_env(4), check=True, capture_output=True,
                   timeout=300)

    multi = tmp_path / "multi"
    port = _free_port()
    # Output to files, not pipes: waiting on one process while the other fills an unread pipe
    # would block both for ever.
    logs = [(tmp_path / f"process{i}.log").open("w+") for i in range(2)]
    procs = [subprocess.Popen([*cli, "--workdir", str(multi), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=_env(2), stdout=log, stderr=subprocess.STDOUT, text=True)
             for i, log in enumerate(logs)]
    for p in procs:
        p.wait(timeout=300)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    final = json.loads((multi / "final.json").read_text())
    assert final["steps"] == 6
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
