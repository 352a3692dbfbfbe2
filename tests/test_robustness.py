"""`vit22b robustness`: ECE, temperature scaling, the image shifts, and the command."""

import json

import numpy as np
import pytest
from scipy.special import softmax

from conftest import run_task
from vit22b.config import preset
from vit22b.data import load_digits_dataset
from vit22b.tasks import robustness
from vit22b.weights import save_model


def run(argv: list[str]) -> int:
    return run_task(robustness, argv)


def _calibrated(n: int = 100_000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, classes))
    p = softmax(logits, axis=1)
    labels = (p.cumsum(1) < rng.uniform(size=(n, 1))).sum(1)
    return logits, np.minimum(labels, classes - 1)


def test_ece_of_calibrated_probabilities_is_near_zero():
    logits, labels = _calibrated()
    assert robustness.ece(softmax(logits, axis=1), labels) < 0.01


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 1])
    # bins of width 1/15: {0.95, 0.95} acc 0.5 -> 0.45 * 2/4; {0.7} acc 1 -> 0.3/4; {0.6} acc 0 -> 0.6/4
    assert robustness.ece(probs, labels) == pytest.approx(0.45 / 2 + 0.3 / 4 + 0.6 / 4)
    assert robustness.ece(np.eye(3), np.arange(3)) == pytest.approx(0.0)  # conf 1.0 lands in the top bin


def test_temperature_scaling_fixes_over_confident_logits():
    logits, labels = _calibrated()
    over = 4.0 * logits
    before = robustness.calibration(over, labels)
    assert before["ece"] > 0.1
    assert before["temperature"] == pytest.approx(4.0, rel=0.05)
    assert before["nll_scaled"] < before["nll"] - 0.1
    assert before["ece_scaled"] < 0.01
    assert robustness.calibration(logits, labels)["temperature"] == pytest.approx(1.0, rel=0.05)


def test_held_out_calibration_fits_on_one_half_and_reports_on_the_other():
    logits, labels = _calibrated()
    cal = robustness.held_out_calibration(4.0 * logits, labels, seed=3)
    assert cal["fit_examples"] + cal["report_examples"] == len(labels)
    assert abs(cal["fit_examples"] - cal["report_examples"]) <= 1
    assert cal["temperature"] == pytest.approx(4.0, rel=0.1)  # the over-confidence put in
    assert cal["ece"] > 0.1 and cal["ece_scaled"] < 0.02  # on images T never saw


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return next(load_digits_dataset(16).eval_batches(32))["image"]


@pytest.mark.parametrize("name", [n for n in robustness.default_shifts() if n != "identity"])
def test_each_shift_changes_the_images(batch, name):
    shifted = robustness.default_shifts()[name](batch)
    assert shifted.shape == batch.shape and shifted.dtype == np.float32
    assert np.abs(shifted - batch).mean() > 0.01
    assert shifted.min() >= -1.0 - 1e-6 and shifted.max() <= 1.0 + 1e-6


def test_neutral_shift_parameters_are_identities(batch):
    np.testing.assert_allclose(robustness.rotate(0)(batch), batch, atol=1e-6)
    np.testing.assert_allclose(robustness.contrast(1.0)(batch), batch, atol=1e-6)
    np.testing.assert_allclose(robustness.noise(0.0)(batch), batch)
    first, again = robustness.noise(0.3, seed=5)(batch), robustness.noise(0.3, seed=5)(batch)
    np.testing.assert_array_equal(first, again)  # seeded
    rot = robustness.rotate(90)(batch)  # a quarter turn moves pixels exactly
    np.testing.assert_allclose(rot, np.rot90(batch, 1, axes=(1, 2)), atol=1e-5)


@pytest.mark.slow
def test_robustness_command(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "rob.json"
    assert run(["--checkpoint", str(digits_ckpt), "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    trained = json.loads((digits_ckpt / "final.json").read_text())["eval_accuracy"]
    shifts = res["shifts"]
    # identity: the held-out accuracy training measured (up to one bf16 argmax flip)
    assert abs(shifts["identity"]["accuracy"] - trained) <= 1 / 360 + 1e-9
    assert set(shifts) == set(robustness.default_shifts())
    assert shifts["rotate_30"]["accuracy"] < shifts["identity"]["accuracy"]
    cal = res["calibration"]
    assert cal["fit_examples"] + cal["report_examples"] == res["val_examples"] == 360
    assert cal["temperature"] > 0
    assert "reported on the other 180" in capsys.readouterr().out


def test_robustness_needs_a_classifier(tmp_path, random_params):
    cfg = preset("mu/4", image_size=8, in_channels=1, num_classes=0)
    save_model(tmp_path / "headless", random_params(cfg), cfg)
    with pytest.raises(ValueError, match="num_classes=0"):
        run(["--checkpoint", str(tmp_path / "headless"), "--no-progress"])
    cfg3 = cfg.replace(num_classes=3)
    save_model(tmp_path / "three", random_params(cfg3), cfg3)
    with pytest.raises(ValueError, match="3 classes but 'digits' has 10"):
        run(["--checkpoint", str(tmp_path / "three"), "--no-progress"])
