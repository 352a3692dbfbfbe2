"""`vit22b fewshot`: the closed-form ridge solution against scikit-learn, sampling, the command."""

import json

import numpy as np
import pytest

from conftest import run_task
from vit22b.data import DataError
from vit22b.tasks import common, fewshot


def run(argv: list[str]) -> int:
    return run_task(fewshot, argv)


@pytest.mark.parametrize(("n", "d", "form"), [(200, 10, "primal"), (30, 50, "dual")])
@pytest.mark.parametrize("lam", [1.0, 1024.0])
def test_ridge_solution_matches_sklearn(n, d, form, lam):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d) + rng.standard_normal(d)
    y = np.arange(n) % 5
    cache = fewshot.prepare(x, y, 5)
    assert cache["form"] == form
    np.testing.assert_allclose(cache["std"], x.std(0, keepdims=True) + 1e-5)
    xb = (x - x.mean(0)) / (x.std(0) + 1e-5)
    xb = np.concatenate([xb, np.full((n, 1), 100.0)], axis=1)
    targets = np.where(np.eye(5)[y] > 0, 1.0, -1.0)
    ref = Ridge(alpha=lam, fit_intercept=False).fit(xb, targets).coef_.T  # [D+1, C]
    w = fewshot.solve(cache, lam)
    assert w.shape == (d + 1, 5)
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # and the prediction path uses the same whitening + bias
    np.testing.assert_allclose(fewshot.whiten(x, cache["mean"], cache["std"]), xb, rtol=1e-10, atol=1e-10)


def test_ridge_separates_clusters_and_regularisation_matters():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 8)) * 3
    y_tr, y_val = np.repeat(np.arange(3), 5), np.repeat(np.arange(3), 100)
    x_tr = centres[y_tr] + rng.standard_normal((15, 8))
    x_val = centres[y_val] + rng.standard_normal((300, 8))
    cache = fewshot.prepare(x_tr, y_tr, 3)
    assert fewshot.fewshot_accuracy(cache, 1.0, x_val, y_val) > 0.95
    assert not np.allclose(fewshot.solve(cache, 1.0), fewshot.solve(cache, 1e4))


def test_sampling_is_per_class_seeded_and_nested():
    y = np.repeat(np.arange(4), 30)
    one, five = fewshot.sample_shots(y, 4, 1, seed=0), fewshot.sample_shots(y, 4, 5, seed=0)
    np.testing.assert_array_equal(np.bincount(y[five]), [5, 5, 5, 5])
    assert set(one) <= set(five) and len(set(five)) == 20
    np.testing.assert_array_equal(five, fewshot.sample_shots(y, 4, 5, seed=0))
    assert not np.array_equal(five, fewshot.sample_shots(y, 4, 5, seed=1))


def test_too_few_examples_per_class_is_a_clear_error():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match=r"class 1 has only 3 .*5-shot.*at most 3"):
        fewshot.sample_shots(y, 2, 5, seed=0)
    with pytest.raises(DataError, match="positive"):
        fewshot.sample_shots(y, 2, 0, seed=0)


@pytest.mark.slow
def test_accuracy_increases_with_shots_on_digits_features(digits_ckpt):
    model, data, _ = common.load_task(checkpoint=str(digits_ckpt), data="digits")
    fn = common.batch_fn(model, "encoded-mean")
    x_tr, y_tr = common.run_batches(fn, data, "train", 512, False, "")
    x_val, y_val = common.run_batches(fn, data, "val", 512, False, "")
    table = fewshot.run_fewshot(x_tr, y_tr, x_val, y_val, 10, [1, 5, 25], [0, 1, 2], [1.0, 1024.0])
    for lam in ("l2=1", "l2=1024"):
        acc = [table[f"{k}shot"][lam]["mean"] for k in (1, 5, 25)]
        assert acc[0] + 0.03 < acc[1] < acc[2] - 0.03, (lam, acc)
        assert acc[2] > 0.4  # chance 0.1
    assert len(table["5shot"]["l2=1024"]["per_seed"]) == 3


@pytest.mark.slow
def test_fewshot_command(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "fs.json"
    assert run(["--checkpoint", str(digits_ckpt), "--shots", "1", "10", "--seeds", "0", "1",
                "--l2-reg", "1", "1024", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"1shot", "10shot"}
    assert set(res["accuracy"]["10shot"]) == {"l2=1", "l2=1024"}
    cell = res["accuracy"]["10shot"]["l2=1024"]
    assert cell["mean"] == pytest.approx(np.mean(cell["per_seed"])) and 0 <= cell["std"] < 0.2
    assert "10shot" in capsys.readouterr().out
    with pytest.raises(DataError, match="too few for 500-shot"):  # digits: ~143 train per class
        run(["--checkpoint", str(digits_ckpt), "--shots", "500", "--no-progress"])
