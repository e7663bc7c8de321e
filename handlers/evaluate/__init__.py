"""The evaluate stage: is the fine-tuned model better than what we had? Numbers, a verdict and a report.

Classification data: label log-likelihood scoring (and/or generation), metrics, calibration, A/B against the
base model and the previous version. Other data: eval losses, perplexity, task metrics of generated answers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from handlers.context import StageContext
from trainbox.errors import StageFailed
from trainbox.protocol import PrepareSummary, StageResult
from trainbox.rows import PAIR_KINDS, Example

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("accuracy", "macro_f1", "critical_recall", "ece", "examples_per_s", "latency_p50_ms",
                "latency_p95_ms", "eval_loss", "perplexity", "example_mean_loss", "exact_match", "token_f1", "rouge_l",
                "chrf")
BASE_KEYS = ("accuracy", "macro_f1", "eval_loss", "perplexity", "exact_match", "token_f1", "rouge_l", "chrf")


def read_split(ctx: StageContext, split: str) -> list[Example]:
    try:
        path = ctx.input_artifact("prepare", split)
    except KeyError as exc:
        raise StageFailed(f"the prepare stage recorded no {split} split ({exc}); evaluate needs prepare's "
                          "splits (stages: [prepare, train, evaluate])") from exc
    text = Path(path).read_text(encoding="utf-8")
    return [Example.from_json(line) for line in text.splitlines() if line.strip()]


def chosen_conversation(ex: Example) -> Example:
    """A preference pair as the conversation it should produce: its prompt turns and the chosen answer."""
    if ex.kind not in PAIR_KINDS:
        return ex
    return Example(id=ex.id, format="messages", meta=ex.meta, kind=ex.kind, source_id=ex.source_id,
                   messages=[*(ex.messages or []), {"role": "assistant", "content": ex.chosen or ""}])


def _labels(ctx: StageContext, rows: list[Example]) -> list[str]:
    prepare = ctx.summary_of("prepare", PrepareSummary)
    labels = prepare.labels if prepare is not None else {}
    return sorted(set(labels) | {ex.label for ex in rows if ex.label is not None})


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The small numbers for the store and the registry: the tuned model's metrics plus the verdict."""
    tuned = results["models"]["tuned"]["metrics"]
    summary: dict[str, Any] = {k: tuned[k] for k in SUMMARY_KEYS if tuned.get(k) is not None}
    summary.update(task=results["task"], winner=results["winner"], winner_reason=results["winner_reason"],
                   reference=results["reference"])
    calib = results.get("calibration")
    if calib:
        summary.update(ece=calib["ece"], ece_after=calib["ece_after"], temperature=calib["temperature"],
                       temperature_fitted=calib["fitted"])
    base = results["models"].get("base", {}).get("metrics", {})
    for key in BASE_KEYS:
        if base.get(key) is not None:
            summary[f"base_{key}"] = base[key]
    comparison = results["comparisons"].get(results["reference"] or "")
    if comparison:
        summary["p_value"] = comparison["mcnemar"]["p_value"] if "mcnemar" in comparison \
            else comparison["wilcoxon_p_value"]
    preference = results.get("preference")
    if preference:
        summary["preference_accuracy"] = preference["models"]["tuned"]["accuracy"]
        summary["preference_pairs"] = preference["pairs"]
        if "base" in preference["models"]:
            summary["base_preference_accuracy"] = preference["models"]["base"]["accuracy"]
        versus = preference["comparisons"].get(results["reference"] or "")
        if versus:
            summary["preference_p_value"] = versus["mcnemar"]["p_value"]
    prev = results["models"].get("previous", {}).get("metrics", {})
    if prev.get("accuracy") is not None:
        summary["previous_accuracy"] = prev["accuracy"]
    return summary


def run(ctx: StageContext) -> StageResult:
    from handlers.evaluate.classification import evaluate_classification
    from handlers.evaluate.generation import evaluate_generation
    from handlers.evaluate.models import load_models
    from handlers.evaluate.preference import evaluate_preferences
    from handlers.evaluate.report import write_reports

    spec = ctx.job.evaluate
    test = read_split(ctx, "test")
    if not test:
        raise StageFailed("the test split is empty: nothing to evaluate; give prepare.split.test a larger share "
                          "or add rows to the dataset")
    if spec.max_examples:
        test = test[:spec.max_examples]
    is_classification = all(ex.format == "classification" for ex in test)
    models = load_models(ctx)
    if is_classification:
        val = read_split(ctx, "val")
        results = evaluate_classification(ctx, models, test, val, _labels(ctx, [*test, *val]))
    else:
        results = evaluate_generation(ctx, models, [chosen_conversation(ex) for ex in test])
    results["preference"] = evaluate_preferences(ctx, models, test)
    artifacts = write_reports(ctx.stage_dir, results, ctx.job, ctx.model)
    summary = summarize(results)
    model = {"metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
             "winner": results["winner"]}
    if summary.get("temperature") is not None:
        model["temperature"] = summary["temperature"]
    verdict = {True: "winner", False: "not a winner", None: "no verdict"}[results["winner"]]
    headline = (f"accuracy {summary['accuracy']:.3f}" if "accuracy" in summary
                else f"token-weighted eval loss {summary['eval_loss']:.4f}")
    if "preference_accuracy" in summary:
        headline += f", preference accuracy {summary['preference_accuracy']:.3f}" + (
            f" (base {summary['base_preference_accuracy']:.3f})" if "base_preference_accuracy" in summary else "")
    return StageResult(summary=summary, artifacts=artifacts, model=model, model_artifacts={"eval_report": "report"},
                       message=f"{headline}; {verdict}: {results['winner_reason']}")
