"""Evaluate statistics on fixed numbers: metrics vs scikit-learn, McNemar by hand, ECE, temperature, winner rule."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from handlers.evaluate import abtest, calibration
from handlers.evaluate.metrics import UNPARSEABLE, classification_metrics, latency_stats
from handlers.evaluate.scoring import parse_final

LABELS = ["ALLOW", "DENY", "ESCALATION", "REFUSE"]
Y_TRUE = ["ALLOW", "ALLOW", "DENY", "DENY", "ESCALATION", "REFUSE", "REFUSE", "REFUSE", "ALLOW", "ESCALATION"]
Y_PRED = ["ALLOW", "DENY", "DENY", "REFUSE", "ESCALATION", "REFUSE", "DENY", "REFUSE", "ALLOW", "ALLOW"]


def test_metrics_equal_scikit_learn_on_fixed_predictions():
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS, "REFUSE")
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED)) == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=LABELS)
    for i, label in enumerate(LABELS):
        assert m["per_class"][label] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i],
                                                       "support": s[i]})
    assert m["critical_recall"] == pytest.approx(2 / 3)
    assert m["confusion"] == {"labels": LABELS, "matrix": confusion_matrix(Y_TRUE, Y_PRED, labels=LABELS).tolist()}
    assert m["unparseable"] == 0


def test_unparseable_answers_count_as_wrong_and_get_a_column():
    pred = [None, *Y_PRED[1:]]
    m = classification_metrics(Y_TRUE, pred, LABELS, "REFUSE")
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["unparseable"] == 1
    assert m["confusion"]["labels"] == [*LABELS, UNPARSEABLE]
    assert m["confusion"]["matrix"][0][4] == 1  # true ALLOW, answered nothing usable
    assert m["per_class"]["ALLOW"]["recall"] == pytest.approx(1 / 3)
    assert classification_metrics(Y_TRUE, Y_PRED, LABELS, "MISSING")["critical_recall"] is None


def test_mcnemar_exact_matches_a_hand_checked_table():
    # 20 pairs: both right 7, only the reference right 1, only the new model right 9, neither 3
    ref = [1] * 7 + [1] * 1 + [0] * 9 + [0] * 3
    new = [1] * 7 + [0] * 1 + [1] * 9 + [0] * 3
    out = abtest.mcnemar_exact([bool(x) for x in ref], [bool(x) for x in new])
    assert out["table"] == [[7, 1], [9, 3]]
    # exact two-sided: 2 * P(X <= 1), X ~ Binomial(10, 1/2) = 2 * (1 + 10) / 1024
    assert out["p_value"] == pytest.approx(22 / 1024)
    assert abtest.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair


def test_bootstrap_cis_are_paired_and_reproducible():
    rng = np.random.default_rng(0)
    y = list(rng.choice(LABELS, 200))
    ref = [t if rng.random() < 0.4 else "ALLOW" for t in y]
    new = [t if rng.random() < 0.9 else "DENY" for t in y]
    a = abtest.bootstrap_differences(y, ref, new, LABELS, 300, seed=1)
    b = abtest.bootstrap_differences(y, ref, new, LABELS, 300, seed=1)
    assert a == b
    acc = a["accuracy_diff"]
    assert acc["estimate"] == pytest.approx(accuracy_score(y, new) - accuracy_score(y, ref))
    assert 0 < acc["ci_low"] < acc["estimate"] < acc["ci_high"]
    same = abtest.bootstrap_differences(y, ref, ref, LABELS, 100, seed=1)
    assert same["macro_f1_diff"] == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def _synthetic(n: int, overconfident: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence c; the top label is right with probability c (calibrated) or 0.5 (overconfident)."""
    rng = np.random.default_rng(seed)
    conf = np.full(n, 0.99) if overconfident else rng.uniform(0.3, 1.0, n)
    top = rng.integers(0, 4, n)
    probs = np.repeat(((1 - conf) / 3)[:, None], 4, axis=1)
    probs[np.arange(n), top] = conf
    right = rng.random(n) < (0.5 if overconfident else conf)
    y = np.where(right, top, (top + rng.integers(1, 4, n)) % 4)
    return probs, y


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    probs, y = _synthetic(40_000, overconfident=False)
    assert calibration.expected_calibration_error(probs, y) < 0.01
    probs, y = _synthetic(5_000, overconfident=True)
    assert calibration.expected_calibration_error(probs, y) == pytest.approx(0.49, abs=0.03)
    bins = calibration.reliability_bins(probs, y)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 5_000 and bins[-1]["count"] == 5_000


def test_temperature_scaling_undoes_overconfidence():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, (6_000, 4))
    y = np.array([rng.choice(4, p=p) for p in calibration.probabilities(z)])
    logits = 3.0 * z  # a model three times too sure of itself
    t = calibration.fit_temperature(logits[:3_000], y[:3_000])
    assert t == pytest.approx(3.0, rel=0.1)
    report = calibration.calibration_report(logits[3_000:], y[3_000:], logits[:3_000], y[:3_000], 4)
    assert report["temperature"] == t
    assert report["ece_after"] < 0.03 < report["ece"]
    assert report["nll_after"] < report["nll"]


def _comparison(ref_acc: float, new_acc: float, p: float, ref_recall: float | None, new_recall: float | None):
    return {"mcnemar": {"p_value": p}, "accuracy": {"ref": ref_acc, "new": new_acc},
            "critical_recall": {"ref": ref_recall, "new": new_recall}}


@pytest.mark.parametrize("case, may_drop, winner, why", [
    (_comparison(0.5, 0.8, 0.001, 0.6, 0.7), False, True, "significant"),
    (_comparison(0.5, 0.8, 0.2, 0.6, 0.7), False, False, "not significant"),
    (_comparison(0.8, 0.7, 0.001, 0.6, 0.7), False, False, "did not improve"),
    (_comparison(0.5, 0.8, 0.001, 0.9, 0.7), False, False, "recall of REFUSE dropped"),
    (_comparison(0.5, 0.8, 0.001, 0.9, 0.7), True, True, "significant"),
    (_comparison(0.5, 0.8, 0.001, None, None), False, True, "significant"),
])
def test_winner_rule(case, may_drop, winner, why):
    won, reason = abtest.decide_winner(case, 0.05, may_drop, "REFUSE")
    assert won is winner and why in reason


def test_reference_choice_and_loss_rule():
    assert abtest.choose_reference({"base": {}, "previous": {}}, "previous") == "previous"
    assert abtest.choose_reference({"base": {}}, "previous") == "base"
    assert abtest.choose_reference({}, "base") is None
    better = abtest.compare_losses([2.0, 2.1, 2.2, 1.9, 2.5, 2.4, 2.3, 2.0, 2.6, 2.2],
                                   [1.0, 1.2, 1.1, 1.0, 1.4, 1.3, 1.1, 0.9, 1.5, 1.2])
    assert better["new_better_fraction"] == 1.0 and better["wilcoxon_p_value"] < 0.01
    assert abtest.decide_loss_winner(better, 0.05)[0] is True
    assert abtest.decide_loss_winner(abtest.compare_losses([1.0, 2.0], [1.0, 2.0]), 0.05)[0] is False


@pytest.mark.parametrize("text, label", [
    ("<think-task>x</think-task><final>DENY</final>", "DENY"),
    ("<think-task>x</think-task><final> refuse </final>", "REFUSE"),
    ("<final>ALLOW", "ALLOW"),  # cut off by max_new_tokens after the label
    ("ESCALATION", "ESCALATION"),
    ("<think-task>x</think-task><final>MAYBE</final>", None),
    ("<think-task>the request is fine", None),
    ("", None),
])
def test_parse_final(text, label):
    assert parse_final(text, LABELS) == label


def test_latency_stats():
    out = latency_stats([0.010, 0.020, 0.030, 0.040], n_examples=100, batched_seconds=2.0)
    assert out["latency_p50_ms"] == pytest.approx(25.0)
    assert out["latency_p95_ms"] == pytest.approx(38.5)
    assert out["examples_per_s"] == pytest.approx(50.0)
