"""Evaluate statistics on fixed numbers: metrics vs scikit-learn, McNemar by hand, ECE, temperature, winner rule,
latency spread, answer metrics."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from handlers.evaluate import abtest, calibration, latency, textmetrics
from handlers.evaluate.metrics import UNPARSEABLE, classification_metrics
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


def _overconfident(n: int, factor: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model reports ``factor`` * z (factor > 1: too sure of itself)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 4))
    y = np.array([rng.choice(4, p=p) for p in calibration.probabilities(z)])
    return factor * z, y


def test_temperature_scaling_undoes_overconfidence_on_a_large_validation_split():
    logits, y = _overconfident(6_000, 3.0, seed=3)
    t = calibration.fit_temperature(logits[:3_000], y[:3_000])
    assert t == pytest.approx(3.0, rel=0.1)
    report = calibration.calibration_report(logits[3_000:], y[3_000:], logits[:3_000], y[:3_000], 4, 100)
    assert report["fitted"] is True and report["temperature"] == t and report["fitted_on"] == "val"
    assert report["cv_nll_after"] < report["cv_nll"] and report["val_nll_after"] < report["val_nll"]
    assert report["ece_after"] < 0.03 < report["ece"]
    assert report["nll_after"] < report["nll"]


def test_a_small_validation_split_keeps_t_1_and_still_shows_what_a_fit_would_do():
    logits, y = _overconfident(132, 3.0, seed=4)
    report = calibration.calibration_report(logits[32:], y[32:], logits[:32], y[:32], 4, 100)
    assert report["fitted"] is False and report["temperature"] == 1.0 and report["fitted_on"] is None
    assert "32 rows, fewer than the 100" in report["reason"]
    assert report["ece_after"] == report["ece"] and report["nll_after"] == report["nll"]
    assert report["candidate_temperature"] > 1 and report["nll_candidate"] is not None
    empty = calibration.calibration_report(logits, y, None, None, 4, 100)
    assert empty["temperature"] == 1.0 and empty["reason"] == "the validation split is empty"


def test_a_calibrated_model_keeps_t_1_when_scaling_does_not_help_out_of_fold():
    logits, y = _overconfident(400, 1.0, seed=5)  # already calibrated: any fitted T only chases noise
    choice = calibration.choose_temperature(logits, y, min_rows=100)
    assert choice["fitted"] is False and choice["temperature"] == 1.0
    assert choice["cv_nll_after"] >= choice["cv_nll"] and "did not lower" in choice["reason"]


@pytest.mark.parametrize("seed", range(12))
def test_no_stored_temperature_makes_the_validation_nll_worse(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    logits, y = _overconfident(n, float(rng.uniform(0.3, 4.0)), seed=seed)
    choice = calibration.choose_temperature(logits, y, min_rows=50, seed=seed)
    stored = calibration.nll_at(logits, y, choice["temperature"])
    assert stored == pytest.approx(choice["val_nll_after"])
    assert stored <= calibration.nll_at(logits, y) + 1e-12
    assert choice["fitted"] or choice["temperature"] == 1.0


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
    ref = {"eval_loss": 2.25, "per_example": [2.0, 2.1, 2.2, 1.9, 2.5, 2.4, 2.3, 2.0, 2.6, 2.2]}
    new = {"eval_loss": 1.2, "per_example": [1.0, 1.2, 1.1, 1.0, 1.4, 1.3, 1.1, 0.9, 1.5, 1.2]}
    better = abtest.compare_losses(ref, new)
    assert better["new_better_fraction"] == 1.0 and better["wilcoxon_p_value"] < 0.01
    assert better["eval_loss"] == {"ref": 2.25, "new": 1.2}
    assert better["example_mean_loss"]["new"] == pytest.approx(1.17)
    won, reason = abtest.decide_loss_winner(better, 0.05)
    assert won is True and "token-weighted eval loss 2.2500 -> 1.2000" in reason
    same = {"eval_loss": 1.5, "per_example": [1.0, 2.0]}
    assert abtest.decide_loss_winner(abtest.compare_losses(same, same), 0.05)[0] is False
    # the rule follows the token-weighted loss even where the per-example mean points the other way
    longer_worse = abtest.compare_losses({**ref, "eval_loss": 1.1}, new)
    assert abtest.decide_loss_winner(longer_worse, 0.05) == (False, "token-weighted eval loss 1.1000 -> 1.2000 "
                                                                    "did not improve")


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


def test_latency_stats_report_the_spread():
    single = np.array([[0.010, 0.020], [0.030, 0.040]])
    out = latency.latency_stats(single, np.array([2.0, 1.0, 3.0]), n_batched=100)
    assert out["latency_p50_ms"] == pytest.approx(25.0)
    assert out["latency_p95_ms"] == pytest.approx(38.5)
    assert out["latency_iqr_ms"] == pytest.approx([17.5, 32.5])
    assert out["latency_samples"] == 4 and out["examples_per_s"] == pytest.approx(50.0)


def test_latency_change_has_a_paired_interval_and_a_throughput_range():
    rng = np.random.default_rng(0)
    base = {"single": rng.normal(0.010, 0.001, (2, 50)), "batched": np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95])}
    slower = {"single": base["single"] * 1.5, "batched": base["batched"] * 1.5}
    change = latency.latency_change(base, slower, 500, seed=1)
    assert change["latency_p50_change_pct"] == pytest.approx(50.0)
    assert change["latency_p50_change"]["ci_low"] == pytest.approx(50.0)  # every pair is exactly 1.5x
    assert change["examples_per_s_change"]["high"] == pytest.approx(100 / 1.5 - 100)
    assert change["directions_agree"] is True
    same = latency.latency_change(base, {"single": base["single"][::-1], "batched": base["batched"][::-1]}, 500, 1)
    assert same["latency_p50_change"]["ci_low"] < 0 < same["latency_p50_change"]["ci_high"]


def _covers_zero(bootstrap: str, runs: int = 120) -> float:
    """How often the 95% interval of the p50 change holds the true change (0: the same model twice) when each
    block of CHUNK examples shares a burst of background load, as on a busy machine."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(runs):
        def timed() -> np.ndarray:
            burst = np.repeat(rng.lognormal(0.0, 0.3, (2, 10)), latency.CHUNK, axis=1)  # 2 rounds x 10 blocks
            return 0.010 * burst * rng.lognormal(0.0, 0.05, (2, 10 * latency.CHUNK))
        a, b = timed(), timed()
        if bootstrap == "blocks":
            ci = latency.latency_change({"single": a, "batched": np.ones(3)}, {"single": b, "batched": np.ones(3)},
                                        400, seed=1)["latency_p50_change"]
            low, high = ci["ci_low"], ci["ci_high"]
        else:  # resampling single examples, as if each were an independent draw
            rows = rng.integers(0, a.size, (400, a.size))
            draws = (np.median(b.ravel()[rows], 1) - np.median(a.ravel()[rows], 1)) / np.median(a.ravel()[rows], 1)
            low, high = np.percentile(draws, [2.5, 97.5])
        hits += low <= 0 <= high
    return hits / runs


def test_the_latency_interval_holds_the_truth_under_bursty_load():
    """The stated spread must be one a rerun lands in: the block bootstrap covers the true change about as
    often as it claims, where resampling single examples misses it most of the time."""
    assert _covers_zero("blocks") >= 0.85
    assert _covers_zero("examples") < 0.8  # a "95 %" interval that holds the truth this rarely misleads


def test_timing_blocks_follow_the_timing_chunks():
    single = np.arange(2 * 7, dtype=float).reshape(2, 7)
    blocks = latency.timing_blocks(single)
    assert blocks.shape == (4, latency.CHUNK) and np.isnan(blocks[1, 2:]).all()
    assert sorted(blocks[~np.isnan(blocks)].tolist()) == single.ravel().tolist()


@pytest.mark.parametrize("lat, thr, agree", [
    ((-30, -40, -20), (20, 10, 30), True),     # faster by both
    ((-30, -40, -20), (-20, -30, -10), False),  # lower latency but clearly lower throughput
    ((-5, -15, 5), (-20, -30, -10), True),      # latency within its noise
    ((40, 30, 50), (25, 10, 40), False),
])
def test_latency_and_throughput_directions(lat, thr, agree):
    latency_ci = dict(zip(("estimate", "ci_low", "ci_high"), lat))
    throughput = dict(zip(("estimate", "low", "high"), thr))
    assert latency.directions_agree(latency_ci, throughput) is agree


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!  It's 42.", ["hello", "world", "it", "s", "42"]),
    ("今日は良い天気です。", ["今", "日", "は", "良", "い", "天", "気", "で", "す"]),
    ("使用Python编程", ["使", "用", "python", "编", "程"]),
    ("ＡＢＣ１２３", ["abc123"]),  # full-width forms fold to ASCII (NFKC)
])
def test_words_split_cjk_by_character(text, expected):
    assert textmetrics.words(text) == expected


def test_answer_scores_on_hand_checked_pairs():
    scores = textmetrics.score_answers(
        ["The cat sat.", "the cat", "dog", "今日は晴れです", "", "the cat sat"],
        ["the cat sat", "the cat sat on the mat", "The cat sat.", "今日は雨です", "", "the cat sat"])
    assert scores["exact_match"] == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # "the cat" vs "the cat sat on the mat": 2 common words, P = 1, R = 2/6
    assert scores["token_f1"][1] == pytest.approx(2 * (1 * 2 / 6) / (1 + 2 / 6))
    assert scores["rouge_l"][1] == pytest.approx(2 * (1 * 2 / 6) / (1 + 2 / 6))
    # 今日は晴れです vs 今日は雨です: LCS 今日はです = 5 chars; P = 5/7, R = 5/6
    assert scores["rouge_l"][3] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert scores["token_f1"][3] == pytest.approx(scores["rouge_l"][3])
    assert scores["chrf"][5] == 1.0 and scores["chrf"][2] == 0.0 and 0.2 < scores["chrf"][3] < 0.8
    assert 0.5 < scores["chrf"][0] < 1.0  # chrF compares characters as written: case and the full stop count
    assert all(scores[name][4] == 1.0 for name in textmetrics.METRICS)  # empty answer to an empty reference


def test_answer_comparison_uses_mcnemar_for_exact_match_and_wilcoxon_otherwise():
    ref = {"exact_match": [0.0] * 12 + [1.0] * 4, "chrf": [0.2 + 0.01 * i for i in range(16)]}
    new = {"exact_match": [1.0] * 12 + [1.0] * 4, "chrf": [0.6 + 0.01 * i for i in range(16)]}
    out = abtest.compare_scores(ref, new, 300, seed=0)
    assert out["exact_match"]["test"] == "McNemar"
    assert out["exact_match"]["p_value"] == pytest.approx(abtest.mcnemar_exact([False] * 12 + [True] * 4,
                                                                               [True] * 16)["p_value"])
    assert out["exact_match"]["diff"] == pytest.approx(0.75) and out["exact_match"]["ci_low"] > 0
    assert out["chrf"]["test"] == "Wilcoxon" and out["chrf"]["p_value"] < 0.001
    assert out["chrf"]["diff"] == pytest.approx(0.4) and out["chrf"]["ci_low"] == pytest.approx(0.4)
