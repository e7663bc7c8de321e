"""Expected calibration error, reliability-diagram data and temperature scaling (fitted with scipy)."""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import log_loss

N_BINS = 15
# log-temperature search range: T in [0.01, 100] covers any sane miscalibration
LOG_T_BOUNDS = (np.log(0.01), np.log(100.0))
CV_FOLDS = 5


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=float) / temperature, axis=1)


def reliability_bins(probs: np.ndarray, y_idx: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Equal-width confidence bins (lo, hi]: count, mean confidence and accuracy of the top-1 prediction."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_idx
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = which == b
        count = int(members.sum())
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": float(confidence[members].mean()) if count else None,
                     "accuracy": float(correct[members].mean()) if count else None})
    return bins


def expected_calibration_error(probs: np.ndarray, y_idx: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: bin-size-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    n = len(y_idx)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(probs, y_idx, n_bins) if b["count"]))


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of the true labels (validation split)."""
    found = minimize_scalar(lambda log_t: nll_at(logits, y_idx, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def nll_at(logits: np.ndarray, y_idx: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels at ``temperature``."""
    scaled = np.asarray(logits, dtype=float) / temperature
    return float(-log_softmax(scaled, axis=1)[np.arange(len(y_idx)), y_idx].mean())


def cross_validated_nll(logits: np.ndarray, y_idx: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    """Out-of-fold validation NLL at T = 1 and with a temperature fitted on the other folds (same rows)."""
    logits, y_idx = np.asarray(logits, dtype=float), np.asarray(y_idx)
    order = np.random.default_rng(seed).permutation(len(y_idx))
    unscaled, scaled = 0.0, 0.0
    for held in np.array_split(order, folds):
        fit_rows = np.setdiff1d(order, held)
        t = fit_temperature(logits[fit_rows], y_idx[fit_rows])
        unscaled += nll_at(logits[held], y_idx[held]) * len(held)
        scaled += nll_at(logits[held], y_idx[held], t) * len(held)
    return unscaled / len(y_idx), scaled / len(y_idx)


def choose_temperature(val_logits: np.ndarray | None, val_idx: np.ndarray | None, min_rows: int,
                       folds: int = CV_FOLDS, seed: int = 0) -> dict[str, Any]:
    """The temperature to store, and why. T = 1 unless the validation split has ``min_rows`` rows, the
    temperature lowers the out-of-fold (cross-validated) NLL there, and it lowers the full validation NLL."""
    n = 0 if val_idx is None else len(val_idx)
    out: dict[str, Any] = {"temperature": 1.0, "fitted": False, "val_rows": n, "min_val_rows": min_rows,
                           "candidate_temperature": None, "val_nll": None, "val_nll_after": None,
                           "cv_nll": None, "cv_nll_after": None}
    if n == 0:
        return {**out, "reason": "the validation split is empty"}
    out["val_nll"] = out["val_nll_after"] = nll_at(val_logits, val_idx)
    candidate = fit_temperature(val_logits, val_idx)
    out["candidate_temperature"] = candidate
    if n < min_rows:
        return {**out, "reason": f"the validation split has {n} rows, fewer than the {min_rows} needed to trust "
                                 "a fitted temperature (evaluate.calibration_min_val_rows)"}
    folds = min(folds, n)
    out["cv_nll"], out["cv_nll_after"] = cross_validated_nll(val_logits, val_idx, folds, seed)
    candidate_nll = nll_at(val_logits, val_idx, candidate)
    if out["cv_nll_after"] >= out["cv_nll"]:
        return {**out, "reason": f"scaling did not lower the {folds}-fold cross-validated validation NLL "
                                 f"({out['cv_nll']:.4f} -> {out['cv_nll_after']:.4f})"}
    if candidate_nll >= out["val_nll"]:  # the bounded search missed T = 1's NLL: never store a worse fit
        return {**out, "reason": f"the fitted temperature did not lower the validation NLL "
                                 f"({out['val_nll']:.4f} -> {candidate_nll:.4f})"}
    return {**out, "temperature": candidate, "fitted": True, "val_nll_after": candidate_nll,
            "reason": f"scaling lowered the {folds}-fold cross-validated validation NLL "
                      f"({out['cv_nll']:.4f} -> {out['cv_nll_after']:.4f})"}


def calibration_report(test_logits: np.ndarray, test_idx: np.ndarray, val_logits: np.ndarray | None,
                       val_idx: np.ndarray | None, n_labels: int, min_val_rows: int = 0,
                       seed: int = 0) -> dict[str, Any]:
    """ECE and NLL on the test split before and after the stored temperature, plus what the candidate fitted on
    all validation rows would have done on test (shown even when it is rejected), and both diagrams."""
    choice = choose_temperature(val_logits, val_idx, min_val_rows, seed=seed)
    before, after = probabilities(test_logits), probabilities(test_logits, choice["temperature"])
    label_ids = list(range(n_labels))
    report = {
        "bins": N_BINS, **choice, "fitted_on": "val" if choice["fitted"] else None,
        "ece": expected_calibration_error(before, test_idx),
        "ece_after": expected_calibration_error(after, test_idx),
        "nll": float(log_loss(test_idx, before, labels=label_ids)),
        "nll_after": float(log_loss(test_idx, after, labels=label_ids)),
        "reliability": reliability_bins(before, test_idx),
        "reliability_after": reliability_bins(after, test_idx),
    }
    if choice["candidate_temperature"] is not None:
        candidate = probabilities(test_logits, choice["candidate_temperature"])
        report.update(ece_candidate=expected_calibration_error(candidate, test_idx),
                      nll_candidate=float(log_loss(test_idx, candidate, labels=label_ids)))
    return report
