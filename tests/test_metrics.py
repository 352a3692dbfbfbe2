"""metrics.py: JSONL + TensorBoard logging, reading back across resumes, PNG plots."""

import json

import pytest

from vit22b.metrics import MetricsWriter, plot_metrics, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_lines(workdir, lines):
    (workdir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_writer_writes_jsonl_and_tensorboard_events(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(10, **{"train/loss": 2.5, "train/lr": 1e-3})
    writer.write(20, **{"train/loss": 1.25})
    writer.write(20, **{"eval/accuracy": 0.75})
    writer.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 10, "train/loss": 2.5, "train/lr": 1e-3},
                       {"step": 20, "train/loss": 1.25},
                       {"step": 20, "eval/accuracy": 0.75}]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"train/loss", b"train/lr", b"eval/accuracy"):
        assert tag in data  # the scalars' tags are recorded in the event file

    # Records of the same step but different keys are all kept.
    assert read_metrics(tmp_path) == {"train/loss": [(10, 2.5), (20, 1.25)],
                                      "train/lr": [(10, 1e-3)], "eval/accuracy": [(20, 0.75)]}


def test_writer_without_tensorboard_and_numpy_values(tmp_path):
    import numpy as np

    writer = MetricsWriter(tmp_path / "new" / "dir", tensorboard=False)
    writer.write(np.int64(3), loss=np.float32(0.5))
    writer.close()
    assert not (tmp_path / "new" / "dir" / "tb").exists()
    assert json.loads((tmp_path / "new" / "dir" / "metrics.jsonl").read_text()) == {"step": 3,
                                                                                   "loss": 0.5}


def test_read_metrics_after_resume_keeps_last_record_per_step(tmp_path):
    """A run killed after step 3 whose last checkpoint was step 1 logs steps 2 and 3 again on resume
    (through a second writer appending to the same file); the rerun's values win."""
    first = MetricsWriter(tmp_path, tensorboard=False)
    for step, loss in [(1, 4.0), (2, 3.0), (3, 2.0)]:
        first.write(step, **{"train/loss": loss})
    first.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False)
    for step, loss in [(2, 3.5), (3, 2.5), (4, 1.0)]:
        resumed.write(step, **{"train/loss": loss})
    resumed.write(4, **{"eval/accuracy": 0.5})
    resumed.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 7  # appended, not truncated
    assert read_metrics(tmp_path) == {"train/loss": [(1, 4.0), (2, 3.5), (3, 2.5), (4, 1.0)],
                                      "eval/accuracy": [(4, 0.5)]}


def test_read_metrics_sorts_by_step_and_skips_a_truncated_last_line(tmp_path):
    write_lines(tmp_path, ['{"step": 5, "train/loss": 1.0}',
                           '{"step": 2, "train/loss": 2.0}',
                           "",
                           '{"step": 7, "train/loss": 0.'])  # a crash mid-write
    assert read_metrics(tmp_path) == {"train/loss": [(2, 2.0), (5, 1.0)]}


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_metrics(tmp_path / "nowhere")


def test_plot_metrics_writes_png(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, **{"train/loss": 1.0 / step, "train/lr": 1e-3 * step})
    writer.write(5, **{"eval/accuracy": 0.9})
    writer.close()
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "metrics.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    other = plot_metrics(tmp_path, tmp_path / "curves.png")
    assert other == tmp_path / "curves.png" and other.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_metrics_with_no_records_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        plot_metrics(tmp_path)
    assert not (tmp_path / "metrics.png").exists()
