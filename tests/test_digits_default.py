"""The README's main command: `vit22b train` with no arguments reaches >= 99.0% held-out accuracy
on scikit-learn's digits (the split is train_test_split(..., test_size=0.2, stratify=y,
random_state=0)'s test part). Wall-clock time is recorded in final.json and reported in the README
(measured there, not asserted here: speed targets live in benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_train_reaches_99_percent(tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as on a user's machine
    out = subprocess.run([sys.executable, "-m", "vit22b.cli", "train", "--no-progress", "--workdir",
                          str(tmp_path / "digits")], env=env, check=True, capture_output=True,
                         text=True, timeout=900)
    final = json.loads((tmp_path / "digits" / "final.json").read_text())
    assert final["eval_examples"] == 360 and final["train_examples"] == 1437
    assert final["eval_accuracy"] >= 0.99, out.stdout[-2000:]
    assert "held-out accuracy" in out.stdout
