"""bench/paper_in_miniature.py: the verdict rules on numbers fixed in advance, and the --quick
report end to end (every claim runs, the report is written, finished runs are reused)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import miniature_report as mr  # noqa: E402
import paper_in_miniature as pim  # noqa: E402


def test_lr_sensitivity_caps_diverged_runs_at_the_initial_loss():
    # Wortsman et al.: mean over the grid of min(loss, cap) - best; a diverged run counts as the cap
    assert pim.lr_sensitivity([1.0, 0.5, None], cap=2.3) == pytest.approx((1.0 + 0.5 + 2.3) / 3 - 0.5)
    assert pim.lr_sensitivity([1.0, 0.5, 9.0], cap=2.3) == pytest.approx((1.0 + 0.5 + 2.3) / 3 - 0.5)
    assert pim.lr_sensitivity([0.4, 0.4], cap=2.3) == 0.0


def test_initial_loss_is_the_uniform_prediction():
    from vit22b.config import preset
    from vit22b.train import TrainConfig

    softmax = TrainConfig(model=preset("mu/4", num_classes=10), loss="softmax")
    assert pim.initial_loss(softmax) == pytest.approx(np.log(10), rel=1e-6)
    sigmoid = TrainConfig(model=preset("mu/4", num_classes=10, head_bias_init=-np.log(9)), loss="sigmoid")
    # each of 10 sigmoids at p = 0.1: -log 0.1 for the true class, -9 log 0.9 for the others
    assert pim.initial_loss(sigmoid) == pytest.approx(-np.log(0.1) - 9 * np.log(0.9), rel=1e-6)


def test_verdicts_follow_the_rules():
    clear = {"teacher_val_accuracy": 0.9, "distilled": {"val_accuracy": [0.85, 0.86, 0.85]},
             "labels": {"val_accuracy": [0.80, 0.81, 0.80]}}
    assert mr.verdict_distillation(clear)[0] == mr.REPRODUCED
    flipped = {**clear, "distilled": clear["labels"], "labels": clear["distilled"]}
    assert mr.verdict_distillation(flipped)[0] == mr.NOT_REPRODUCED
    within = {**clear, "distilled": {"val_accuracy": [0.801, 0.812, 0.80]}}
    assert mr.verdict_distillation(within)[0] == mr.INCONCLUSIVE
    # claim 6: the larger model's probe closes 75% / 25% / none of the gap to fine-tuning
    base = {"probe_small": 0.6, "finetune_small": 0.8, "params": {"large": 4, "small": 1}}
    assert mr.verdict_probe({**base, "probe_large": 0.75})[0] == mr.REPRODUCED
    assert mr.verdict_probe({**base, "probe_large": 0.65})[0] == mr.INCONCLUSIVE
    assert mr.verdict_probe({**base, "probe_large": 0.55})[0] == mr.NOT_REPRODUCED
    assert mr.verdict_probe({**base, "probe_large": 0.75, "finetune_small": 0.55})[0] == mr.INCONCLUSIVE

    def sens(x: float, logit: float) -> dict:
        return {"lr_sensitivity": x, "attn_logit_max": [{"step": [10], "layer_0": [logit]}]}

    qk = {"widths": {"32": {"qk_norm": sens(0.1, 5.0), "no_qk_norm": sens(0.5, 900.0)}}}
    verdict, text = mr.verdict_qk(qk)
    assert verdict == mr.REPRODUCED and "5 with vs 900 without" in text
    qk["widths"]["64"] = {"qk_norm": sens(0.3, 5.0), "no_qk_norm": sens(0.2, 5.0)}
    assert mr.verdict_qk(qk)[0] == mr.NOT_REPRODUCED


def test_scaling_fit_recovers_a_known_power_law():
    n = [1e3, 3e3, 1e4, 3e4]
    fit = pim.power_law_fit(n, [2.0 * x**-0.3 for x in n])
    assert fit["exponent"] == pytest.approx(-0.3, abs=1e-9) and fit["coefficient"] == pytest.approx(2.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = pim.power_law_fit(n, [0.3, 0.1, 0.4, 0.2])
    assert noisy["r2"] < 0.5
    rows = [{"params": int(x), "val_error": 2.0 * x**-0.3} for x in n]
    assert mr.verdict_scaling({"rows": rows, "fit": fit})[0] == mr.REPRODUCED
    assert mr.verdict_scaling({"rows": rows, "fit": noisy})[0] != mr.REPRODUCED


@pytest.mark.slow
def test_quick_report_end_to_end_and_reuse(tmp_path):
    work, out = tmp_path / "runs", tmp_path / "report"
    subprocess.run([sys.executable, str(BENCH / "paper_in_miniature.py"), "--quick", "--workdirs", str(work),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=1500)
    res = json.loads((out / "results.json").read_text())
    assert [v["claim"][:2] for v in res["verdicts"]] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert {v["verdict"] for v in res["verdicts"]} <= {mr.REPRODUCED, mr.NOT_REPRODUCED, mr.INCONCLUSIVE}
    readme = (out / "README.md").read_text()
    pngs = ("qk_norm_lr.png", "attention_logits.png", "ablations.png", "scaling.png", "map_attention.png")
    for png in pngs:
        assert (out / png).stat().st_size > 1000 and f"]({png})" in readme
    # every reported accuracy is the one its work dir's final.json holds
    for name in pim.ABLATIONS:
        final = json.loads((work / "ablation" / f"{pim.slug(name)}_s0" / "final.json").read_text())
        assert res["ablations"][name]["val_accuracy"] == [final["eval_accuracy"]]
    # the MAP head's attention over the 2x2 token grid of 8-px digits: a distribution per image
    att = np.array(res["map_attention"]["attention"])
    assert att.shape == (8, 2, 2)
    np.testing.assert_allclose(att.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # the attention-logit curves were logged for every layer of every QK run
    curves = res["qk_norm"]["widths"]["32"]["qk_norm"]["attn_logit_max"][0]
    assert set(curves) == {"step", "layer_0", "layer_1"} and curves["step"] == [10, 20, 30, 40]
    # a rerun reuses finished work dirs instead of training again
    runner = pim.Runner(pim.QUICK, work)
    final = work / "ablation" / "paper_default_s0" / "final.json"
    before = final.stat().st_mtime_ns
    t0 = time.time()
    again = runner.run("ablation/paper_default_s0", {})
    assert final.stat().st_mtime_ns == before and time.time() - t0 < 5
    assert again["final"]["eval_accuracy"] == res["ablations"]["paper default"]["val_accuracy"][0]
