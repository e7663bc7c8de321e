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
    logits = np.asarray(logits, dtype=float)
    rows = np.arange(len(y_idx))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, y_idx].mean())

    found = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def calibration_report(test_logits: np.ndarray, test_idx: np.ndarray, val_logits: np.ndarray | None,
                       val_idx: np.ndarray | None, n_labels: int) -> dict[str, Any]:
    """ECE before/after temperature scaling (fitted on validation rows), the temperature and both diagrams."""
    before = probabilities(test_logits)
    temperature = fit_temperature(val_logits, val_idx) if val_logits is not None and len(val_idx) else 1.0
    after = probabilities(test_logits, temperature)
    label_ids = list(range(n_labels))
    return {
        "bins": N_BINS,
        "temperature": temperature,
        "fitted_on": "val" if val_logits is not None and len(val_idx) else None,
        "ece": expected_calibration_error(before, test_idx),
        "ece_after": expected_calibration_error(after, test_idx),
        "nll": float(log_loss(test_idx, before, labels=label_ids)),
        "nll_after": float(log_loss(test_idx, after, labels=label_ids)),
        "reliability": reliability_bins(before, test_idx),
        "reliability_after": reliability_bins(after, test_idx),
    }
