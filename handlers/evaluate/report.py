"""Evaluation outputs: evaluation_results.json, predictions.jsonl, summary.csv, PNGs and a self-contained
report.html (images embedded as data: URIs, styles inline, no external assets).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from handlers.evaluate import plots
from trainbox.fsio import write_json_atomically, write_text_atomically
from trainbox.numberformat import format_value

RESULTS_SCHEMA_VERSION = 1
CLASSIFICATION_COLUMNS = ("accuracy", "macro_f1", "critical_recall", "ece", "latency_p50_ms", "latency_p95_ms",
                          "examples_per_s", "unparseable")
GENERATION_COLUMNS = ("eval_loss", "perplexity", "example_mean_loss", "tokens", "exact_match", "token_f1", "rouge_l",
                      "chrf", "answered")
# per-example arrays live in predictions.jsonl
DROPPED_KEYS = ("logits", "probs", "pred", "outputs", "answer_scores")


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_document(results: dict[str, Any], job: Any, model: dict[str, Any] | None) -> dict[str, Any]:
    models = {name: {k: v for k, v in m.items() if k not in DROPPED_KEYS} for name, m in results["models"].items()}
    for m in models.values():
        if "generation" in m:
            m["generation"] = {k: v for k, v in m["generation"].items() if k not in DROPPED_KEYS}
    doc = {k: v for k, v in results.items() if k not in ("models", "y_true", "ids", "references", "preference")}
    pref = results.get("preference")  # per-pair outcomes live in preference_pairs.jsonl
    doc["preference"] = {**{k: v for k, v in pref.items() if k not in ("models", "ids")},
                         "models": {n: {k: v for k, v in m.items() if k != "correct"}
                                    for n, m in pref["models"].items()}} if pref else None
    return _clean({"schema_version": RESULTS_SCHEMA_VERSION, "created_at": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "job": job.name, "model": model, "base_model": job.base_model,
        "mode": job.evaluate.mode, "critical_label": job.evaluate.critical_label, "n_test": _n_test(results),
        "winner_rule": job.evaluate.winner_rule.model_dump(), "bootstrap_samples": job.evaluate.bootstrap_samples,
        "max_new_tokens": job.evaluate.max_new_tokens,
        **doc, "models": models})


def _n_test(results: dict[str, Any]) -> int:
    if results["task"] == "classification":
        return len(results["y_true"])
    return len(next(iter(results["models"].values()))["metrics"]["per_example"])


def write_predictions(path: Path, results: dict[str, Any]) -> None:
    lines = []
    for i, (row_id, label) in enumerate(zip(results["ids"], results["y_true"])):
        row: dict[str, Any] = {"id": row_id, "label": label}
        for name, m in results["models"].items():
            row[name] = m["pred"][i]
            if "probs" in m:
                row[f"{name}_probs"] = {lab: round(float(p), 6) for lab, p in zip(results["labels"], m["probs"][i])}
            if "generation" in m:
                row[f"{name}_generated"] = m["generation"]["outputs"][i]
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomically(path, "\n".join(lines) + "\n")


def write_answers(path: Path, results: dict[str, Any]) -> None:
    """Generation data: each scored answer per model with its task metrics, next to the reference."""
    lines = []
    for i, (row_id, reference) in enumerate(zip(results["ids"], results["references"])):
        row: dict[str, Any] = {"id": row_id, "reference": reference}
        for name, m in results["models"].items():
            row[name] = m["outputs"][i]
            row[f"{name}_scores"] = {k: round(v[i], 6) for k, v in m["answer_scores"].items()}
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomically(path, "\n".join(lines) + "\n")


def write_pair_outcomes(path: Path, preference: dict[str, Any]) -> None:
    """Per held-out pair: whether each model scored the chosen answer higher."""
    models = preference["models"]
    lines = [json.dumps({"id": pair_id, **{f"{n}_chosen_higher": m["correct"][i] for n, m in models.items()}})
             for i, pair_id in enumerate(preference["ids"])]
    write_text_atomically(path, "\n".join(lines) + "\n")


def summary_csv(results: dict[str, Any]) -> str:
    columns = CLASSIFICATION_COLUMNS if results["task"] == "classification" else GENERATION_COLUMNS
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", *columns, "winner"])
    for name, m in results["models"].items():
        winner = results["winner"] if name == "tuned" else ""
        writer.writerow([name, *(_csv_value(m["metrics"].get(c)) for c in columns), winner])
    return buf.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def make_plots(stage_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """PNG files by artifact name."""
    out: dict[str, Path] = {}
    if results["task"] == "classification":
        for name, m in results["models"].items():
            out[f"confusion_{name}"] = plots.confusion_png(m["metrics"]["confusion"], f"Confusion matrix: {name}",
                                                           stage_dir / f"confusion_{name}.png")
        out["per_class"] = plots.per_class_png({n: m["metrics"] for n, m in results["models"].items()},
                                               results["labels"], stage_dir / "per_class.png")
        if results["calibration"]:
            out["reliability"] = plots.reliability_png(results["calibration"], stage_dir / "reliability.png")
    else:
        out["loss_distribution"] = plots.loss_png(
            {n: m["metrics"]["per_example"] for n, m in results["models"].items()}, stage_dir / "loss.png")
    return out


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    return format_value(value, digits, missing="–")  # the report's typography: an en dash for a missing value


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:+.1f}%"


def _pvalue(value: float, prose: bool = False) -> str:
    text = "< 0.0001" if value < 1e-4 else f"{value:.4f}"
    return ("p " if text.startswith("<") else "p = ") + text if prose else text


def render_html(doc: dict[str, Any], images: dict[str, Path]) -> str:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "jinja"]))
    env.filters.update(fmt=_fmt, pct=_pct, pvalue=_pvalue)
    template = env.get_template("report.html.jinja")
    return template.render(doc=doc, images={k: data_uri(p) for k, p in images.items()})


def write_reports(stage_dir: Path, results: dict[str, Any], job: Any,
                  model: dict[str, Any] | None) -> dict[str, str]:
    """Write every report file; returns artifact name -> path relative to the stage directory."""
    stage_dir = Path(stage_dir)
    doc = results_document(results, job, model)
    write_json_atomically(stage_dir / "evaluation_results.json", doc)
    write_text_atomically(stage_dir / "summary.csv", summary_csv(results))
    artifacts = {"results": "evaluation_results.json", "summary_csv": "summary.csv"}
    if results["task"] == "classification":
        write_predictions(stage_dir / "predictions.jsonl", results)
        artifacts["predictions"] = "predictions.jsonl"
    elif results["answered"]:
        write_answers(stage_dir / "answers.jsonl", results)
        artifacts["answers"] = "answers.jsonl"
    if results.get("preference"):
        write_pair_outcomes(stage_dir / "preference_pairs.jsonl", results["preference"])
        artifacts["preference_pairs"] = "preference_pairs.jsonl"
    images = make_plots(stage_dir, results)
    write_text_atomically(stage_dir / "report.html", render_html(doc, images))
    artifacts["report"] = "report.html"
    artifacts.update({name: path.name for name, path in images.items()})
    return artifacts
