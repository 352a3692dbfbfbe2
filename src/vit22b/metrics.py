"""Metrics: one JSON line per record (metrics.jsonl) plus TensorBoard event files; PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends to `workdir/metrics.jsonl` and writes TensorBoard events under `workdir/tb/`.

    After a resume, steps between the last checkpoint and the crash are logged again; readers keep
    the last record per (step, key) (see `read_metrics`).
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # False on all but the lead process of a multi-process run
        self._tb = None
        if not enabled:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            self._tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for k, v in values.items():
            record[k] = float(v)
            if self._tb is not None:
                self._tb.add_scalar(k, float(v), int(step))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step, keeping the last record for each step."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a `vit22b train` work dir?")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = record.pop("step")
        for k, v in record.items():
            series.setdefault(k, {})[step] = v
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_metrics(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every logged series (loss, accuracy, lr, ...) into one PNG, a panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(workdir)
    if not series:
        raise ValueError(f"{workdir}/metrics.jsonl has no records yet")
    keys = sorted(series, key=lambda k: (not k.startswith("train/loss"), not k.startswith("eval"), k))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.startswith("train/loss") and min(values) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(workdir) / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
