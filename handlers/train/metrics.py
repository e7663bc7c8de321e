"""Training metrics: one row per optimizer step in JSONL and CSV, the four-panel plot, the final report.

The in-memory history travels inside every checkpoint, so after a resume the files are rewritten from it
and hold exactly one row per step, as if the run had never stopped.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from handlers.diskspace import best_effort
from trainbox.fsio import write_json_atomically, write_text_atomically

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss_generation", "loss_style", "loss_relationship", "loss_contrastive")  # null: no rows of it
COLUMNS = ("step", "epoch", "loss", *LOSS_TERMS, "preference_accuracy", "learning_rate", "grad_norm",
           "tokens_per_s", "samples_per_s", "eval_loss", "perplexity", "elapsed_s", "time")
SUMMARY_METRICS = ("loss", *LOSS_TERMS, "preference_accuracy", "learning_rate", "grad_norm", "tokens_per_s",
                   "samples_per_s", "eval_loss", "perplexity")
JSONL = "metrics/training_metrics.jsonl"
CSV = "metrics/training_metrics.csv"
PLOT = "plots/training_curves.png"


def utc_stamp(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class MetricsLog:
    """Appends step rows to the JSONL file as they happen (flushed, so ``tail -f`` and tests see them).

    A line lost to a full disk is not lost for good: the next append rewrites the file from the in-memory
    history, so the file again holds exactly one row per step.
    """

    def __init__(self, stage_dir: Path, history: list[dict[str, Any]], write: bool = True):
        self.stage_dir = stage_dir
        self.history = list(history)
        self._fh: TextIO | None = None
        self._lost = True  # the file does not hold the history until it is written
        if write:  # only rank 0 of a distributed run writes; the other ranks keep the history in memory
            best_effort("training metrics", self._rewrite)

    def _rewrite(self) -> None:
        self.close()
        write_text_atomically(self.stage_dir / JSONL, "".join(json.dumps(r) + "\n" for r in self.history))
        self._fh = open(self.stage_dir / JSONL, "a", encoding="utf-8")
        self._lost = False

    def _append_line(self, line: str) -> None:
        if self._lost or self._fh is None:  # the rewrite includes this row
            self._rewrite()
            return
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError:
            self._lost = True
            self.close()
            raise

    def append(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in COLUMNS}
        self.history.append(row)
        best_effort("training metrics", lambda: self._append_line(json.dumps(row) + "\n"))

    def ensure_complete(self) -> None:
        """Rewrite the JSONL file from the history if a line was lost (raises while the disk is still full)."""
        if self._lost:
            self._rewrite()
        self.close()

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.close()
        except OSError as exc:  # close flushes an unwritable buffer again; the descriptor is closed anyway
            self._lost = True
            log.warning("%s: %s; it is rewritten from memory once there is space", JSONL, exc.strerror or exc)

    def write_csv(self) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
        write_text_atomically(self.stage_dir / CSV, buf.getvalue())
        return self.stage_dir / CSV


def metric_stats(history: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """min/max/mean/std/final of each metric over the steps where it was recorded."""
    out = {}
    for name in SUMMARY_METRICS:
        values = [float(r[name]) for r in history if r.get(name) is not None and math.isfinite(float(r[name]))]
        out[name] = {"min": min(values) if values else None, "max": max(values) if values else None,
                     "mean": statistics.fmean(values) if values else None,
                     "std": statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None),
                     "final": values[-1] if values else None, "count": len(values)}
    return out


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Four panels: loss with eval loss and every loss term that has values, learning rate, grad norm,
    throughput."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a daemon child
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    terms = tuple(t for t in LOSS_TERMS if any(r.get(t) is not None for r in history))
    panels = [(axes[0][0], ("loss", "eval_loss", *terms), "loss"), (axes[0][1], ("learning_rate",), "learning rate"),
              (axes[1][0], ("grad_norm",), "grad norm"), (axes[1][1], ("tokens_per_s",), "tokens/s")]
    for ax, keys, title in panels:
        for key in keys:
            xs, ys = series(key)
            ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, markersize=3, label=key,
                    linewidth=0.8 if key in LOSS_TERMS else 1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(stage_dir: Path, history: list[dict[str, Any]], config: dict[str, Any], started: float,
                 ended: float, total_steps: int, files: dict[str, str], extra: dict[str, Any]) -> tuple[Path, Path]:
    """``reports/report_<UTC>.json`` (everything) and ``reports/summary_<UTC>.csv`` (per-metric stats)."""
    stamp = utc_stamp(ended)
    stats = metric_stats(history)
    report = {"config": config, "started": utc_stamp(started), "ended": stamp,
              "duration_s": round(ended - started, 3), "total_steps": total_steps,
              "final": {k: v["final"] for k, v in stats.items()}, "stats": stats, "files": files,
              "history": history, **extra}
    report_path = stage_dir / "reports" / f"report_{stamp}.json"
    write_json_atomically(report_path, report)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "final", "min", "max", "mean", "std", "count"])
    for name, s in stats.items():
        writer.writerow([name, *("" if s[k] is None else s[k] for k in ("final", "min", "max", "mean", "std")),
                         s["count"]])
    summary_path = stage_dir / "reports" / f"summary_{stamp}.csv"
    write_text_atomically(summary_path, buf.getvalue())
    return report_path, summary_path
