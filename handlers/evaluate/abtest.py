"""Paired A/B statistics on one test split: exact McNemar, bootstrap CIs, latency change, the winner rule."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import binomtest, wilcoxon

from handlers.evaluate.metrics import macro_f1

NO_REFERENCE = "no reference model was evaluated (evaluate.compare_base is false and there is no previous version)"


def choose_reference(comparisons: dict[str, Any], against: str) -> str | None:
    """The model the winner rule compares with: ``against`` when evaluated, else base, else previous."""
    for name in (against, "base", "previous"):
        if name in comparisons:
            return name
    return None


def mcnemar_exact(correct_ref: Sequence[bool], correct_new: Sequence[bool]) -> dict[str, Any]:
    """Exact (binomial) McNemar test on the discordant pairs; ``table`` is [[both, ref only], [new only, neither]]."""
    ref = np.asarray(correct_ref, dtype=bool)
    new = np.asarray(correct_new, dtype=bool)
    both, ref_only = int((ref & new).sum()), int((ref & ~new).sum())
    new_only, neither = int((~ref & new).sum()), int((~ref & ~new).sum())
    discordant = ref_only + new_only
    p_value = binomtest(new_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"table": [[both, ref_only], [new_only, neither]], "ref_only": ref_only, "new_only": new_only,
            "p_value": float(p_value)}


def paired_accuracy_ci(correct_ref: Sequence[bool], correct_new: Sequence[bool], samples: int,
                       seed: int) -> dict[str, float]:
    """new - ref accuracy on the same items, with a paired percentile bootstrap 95% CI (same resampled rows)."""
    diff = np.asarray(correct_new, dtype=float) - np.asarray(correct_ref, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(diff), (samples, len(diff)))
    draws = diff[rows].mean(axis=1)  # accuracy is a mean of per-row correctness: its resamples vectorise
    return {"estimate": float(diff.mean()), "ci_low": float(np.percentile(draws, 2.5)),
            "ci_high": float(np.percentile(draws, 97.5))}


def bootstrap_differences(y_true: Sequence[str], pred_ref: Sequence[str | None], pred_new: Sequence[str | None],
                          labels: list[str], samples: int, seed: int) -> dict[str, dict[str, float]]:
    """Paired percentile bootstrap 95% CIs of new - ref for accuracy and macro-F1 (same resampled rows)."""
    codes = {label: i for i, label in enumerate(labels)}
    other = len(labels)  # unparseable answers and labels outside the set: always wrong
    y = np.asarray([codes.get(t, other) for t in y_true])
    ref = np.asarray([codes.get(p, other + 1) if p is not None else other + 1 for p in pred_ref])
    new = np.asarray([codes.get(p, other + 1) if p is not None else other + 1 for p in pred_new])
    ids = list(range(len(labels)))
    rows = np.random.default_rng(seed).integers(0, len(y), (samples, len(y)))  # the rows paired_accuracy_ci draws
    f1_diff = np.asarray([macro_f1(y[r], new[r], ids) - macro_f1(y[r], ref[r], ids) for r in rows])
    point_f1 = macro_f1(y, new, ids) - macro_f1(y, ref, ids)
    return {"accuracy_diff": paired_accuracy_ci(ref == y, new == y, samples, seed),
            "macro_f1_diff": {"estimate": float(point_f1), "ci_low": float(np.percentile(f1_diff, 2.5)),
                              "ci_high": float(np.percentile(f1_diff, 97.5))}}


def compare_classifiers(y_true: Sequence[str], ref: dict[str, Any], new: dict[str, Any], labels: list[str],
                        samples: int, seed: int) -> dict[str, Any]:
    """Paired comparison of two evaluated models' predictions (dicts with ``pred`` and ``metrics``)."""
    correct_ref = [p == t for p, t in zip(ref["pred"], y_true)]
    correct_new = [p == t for p, t in zip(new["pred"], y_true)]
    return {
        "mcnemar": mcnemar_exact(correct_ref, correct_new),
        "bootstrap": bootstrap_differences(y_true, ref["pred"], new["pred"], labels, samples, seed),
        "accuracy": {"ref": ref["metrics"]["accuracy"], "new": new["metrics"]["accuracy"]},
        "macro_f1": {"ref": ref["metrics"]["macro_f1"], "new": new["metrics"]["macro_f1"]},
        "critical_recall": {"ref": ref["metrics"]["critical_recall"], "new": new["metrics"]["critical_recall"]},
    }


def compare_losses(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Eval losses of two models on the same rows (generation datasets): each token-weighted eval loss (the
    headline, the winner rule's), and the paired Wilcoxon signed-rank test on per-example mean losses."""
    a, b = np.asarray(ref["per_example"], dtype=float), np.asarray(new["per_example"], dtype=float)
    differs = not np.allclose(a, b)
    p_value = float(wilcoxon(b, a).pvalue) if differs and len(a) > 1 else 1.0
    return {"eval_loss": {"ref": ref["eval_loss"], "new": new["eval_loss"]},
            "example_mean_loss": {"ref": float(a.mean()), "new": float(b.mean())},
            "wilcoxon_p_value": p_value, "new_better_fraction": float((b < a).mean())}


def compare_scores(ref: dict[str, Sequence[float]], new: dict[str, Sequence[float]], samples: int,
                   seed: int) -> dict[str, dict[str, Any]]:
    """Per task metric, paired on the same examples: both means, a bootstrap 95% CI of the mean difference, and
    a paired test (exact McNemar for exact match, which is right or wrong; Wilcoxon signed-rank otherwise)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ref:
        a, b = np.asarray(ref[name], dtype=float), np.asarray(new[name], dtype=float)
        if not len(a):
            continue
        rows = np.random.default_rng(seed).integers(0, len(a), (samples, len(a)))
        draws = (b - a)[rows].mean(axis=1)
        if name == "exact_match":
            test, p_value = "McNemar", mcnemar_exact(a > 0.5, b > 0.5)["p_value"]
        else:
            differs = not np.allclose(a, b)
            test, p_value = "Wilcoxon", float(wilcoxon(b, a).pvalue) if differs and len(a) > 1 else 1.0
        out[name] = {"ref": float(a.mean()), "new": float(b.mean()), "diff": float((b - a).mean()),
                     "ci_low": float(np.percentile(draws, 2.5)), "ci_high": float(np.percentile(draws, 97.5)),
                     "test": test, "p_value": p_value}
    return out


def judge(comparisons: dict[str, Any], against: str,
          decide: Callable[[dict[str, Any]], tuple[bool, str]]) -> tuple[str | None, bool | None, str]:
    """(reference, winner, reason): apply ``decide`` to the comparison with the chosen reference model."""
    reference = choose_reference(comparisons, against)
    if reference is None:
        return None, None, NO_REFERENCE
    winner, reason = decide(comparisons[reference])
    return reference, winner, f"against the {reference} model: {reason}"


def decide_winner(comparison: dict[str, Any], alpha: float, critical_recall_may_drop: bool,
                  critical_label: str | None) -> tuple[bool, str]:
    """The winner rule: a significant accuracy gain, and the critical label's recall does not drop."""
    p = comparison["mcnemar"]["p_value"]
    gain = comparison["accuracy"]["new"] - comparison["accuracy"]["ref"]
    if gain <= 0:
        return False, f"accuracy did not improve ({comparison['accuracy']['ref']:.3f} -> " \
                      f"{comparison['accuracy']['new']:.3f})"
    if p >= alpha:
        return False, f"accuracy gain {gain:+.3f} is not significant (McNemar p={p:.3g} >= alpha {alpha})"
    recall = comparison["critical_recall"]
    if recall["ref"] is not None and recall["new"] is not None and recall["new"] < recall["ref"]:
        if not critical_recall_may_drop:
            return False, f"recall of {critical_label} dropped ({recall['ref']:.3f} -> {recall['new']:.3f})"
    return True, f"accuracy gain {gain:+.3f} is significant (McNemar p={p:.3g} < {alpha})" + (
        f" and recall of {critical_label} did not drop" if recall["ref"] is not None else "")


def decide_loss_winner(comparison: dict[str, Any], alpha: float) -> tuple[bool, str]:
    """Generation datasets: a lower token-weighted eval loss, significant by the paired Wilcoxon test on the
    per-example losses."""
    ref, new = comparison["eval_loss"]["ref"], comparison["eval_loss"]["new"]
    p = comparison["wilcoxon_p_value"]
    change = f"token-weighted eval loss {ref:.4f} -> {new:.4f}"
    if new >= ref:
        return False, f"{change} did not improve"
    if p >= alpha:
        return False, f"{change} is not significant (Wilcoxon p={p:.3g} >= {alpha} on per-example losses)"
    return True, f"{change}, significant (Wilcoxon p={p:.3g} < {alpha} on per-example losses)"
