"""Classification metrics (scikit-learn does the counting)."""
from __future__ import annotations

from typing import Any, Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

UNPARSEABLE = "(unparseable)"


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: list[str],
                           critical_label: str | None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1/support, confusion matrix; ``None`` predictions count as wrong."""
    pred = [p if p is not None else UNPARSEABLE for p in y_pred]
    matrix_labels = labels + ([UNPARSEABLE] if UNPARSEABLE in pred else [])
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=labels, zero_division=0)
    per_class = {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for label, p, r, f, s in zip(labels, precision, recall, f1, support)}
    critical = per_class.get(critical_label) if critical_label else None
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "critical_recall": critical["recall"] if critical else None,
        "per_class": per_class,
        "confusion": {"labels": matrix_labels,
                      "matrix": confusion_matrix(y_true, pred, labels=matrix_labels).tolist()},
        "unparseable": pred.count(UNPARSEABLE),
    }


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: list[str]) -> float:
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
