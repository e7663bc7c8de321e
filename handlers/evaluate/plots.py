"""Report figures as PNG files (matplotlib, headless Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in a stage process
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

COLORS = {"base": "#9aa5b1", "previous": "#e0a458", "tuned": "#2b6cb0"}
DPI = 110


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def confusion_png(confusion: dict[str, Any], title: str, path: Path) -> Path:
    labels = confusion["labels"]
    size = 2.2 + 0.75 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 0.6, size))
    ConfusionMatrixDisplay(np.asarray(confusion["matrix"]), display_labels=labels).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path)


def reliability_png(calibration: dict[str, Any], path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling, with the diagonal."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888", linewidth=1, label="perfectly calibrated")
    series = (("reliability", f"before (ECE {calibration['ece']:.3f})", "#c05621"),
              ("reliability_after", f"T={calibration['temperature']:.2f} (ECE {calibration['ece_after']:.3f})",
               "#2b6cb0"))
    for key, label, color in series:
        filled = [b for b in calibration[key] if b["count"]]
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", color=color,
                label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram ({calibration['bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def per_class_png(per_model: dict[str, dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Recall and F1 per class, one bar per evaluated model."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    width = 0.8 / max(1, len(per_model))
    x = np.arange(len(labels))
    for ax, metric in zip(axes, ("recall", "f1")):
        for j, (name, metrics) in enumerate(per_model.items()):
            values = [metrics["per_class"][label][metric] for label in labels]
            ax.bar(x + (j - (len(per_model) - 1) / 2) * width, values, width, label=name,
                   color=COLORS.get(name, None))
        ax.set_xticks(x, labels, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(metric)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def loss_png(per_model: dict[str, list[float]], path: Path) -> Path:
    """Distribution of per-example eval losses for each model (generation datasets)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = [v for losses in per_model.values() for v in losses]
    bins = np.linspace(min(values), max(values), 25) if values and min(values) < max(values) else 10
    for name, losses in per_model.items():
        ax.hist(losses, bins=bins, alpha=0.6, label=name, color=COLORS.get(name, None))
    ax.set_xlabel("per-example eval loss (nats/token)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    return _save(fig, path)
