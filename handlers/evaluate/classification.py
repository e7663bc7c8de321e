"""Classification evaluation: score every model on the test split, calibrate the tuned one, A/B them."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from handlers.evaluate import abtest, calibration, latency, scoring
from handlers.evaluate.metrics import classification_metrics
from handlers.evaluate.models import BASE, PREVIOUS, TUNED, EvalModels
from handlers.modelio import prompt_text
from trainbox.rows import Example

log = logging.getLogger(__name__)
SHOWN_UNPARSEABLE = 50


def _prompts(tokenizer: Any, examples: Sequence[Example]) -> list[str]:
    return [prompt_text(tokenizer, [{"role": "user", "content": ex.text or ""},
                                    {"role": "assistant", "content": ""}]) for ex in examples]


def _likelihood(ctx: Any, model: Any, models: EvalModels, cands: scoring.Candidates, variant: str) -> np.ndarray:
    spec, pad = ctx.job.evaluate, models.tokenizer.pad_token_id

    def progress(done: int, total: int) -> None:
        ctx.report_progress(phase=f"scoring {variant}", step=done, total_steps=total)

    return scoring.label_logits(model, cands, spec.batch_size, pad, models.device, progress, ctx.should_stop)


def _generation(ctx: Any, model: Any, models: EvalModels, test: Sequence[Example], labels: list[str]) -> dict[str, Any]:
    spec = ctx.job.evaluate
    ctx.report_progress(force=True, phase="generating")
    outputs = scoring.generate(model, models.tokenizer, _prompts(models.tokenizer, test), spec.max_new_tokens,
                               spec.batch_size, models.device, ctx.should_stop)
    pred = [scoring.parse_final(o, labels) for o in outputs]
    unparseable = [{"id": ex.id, "text": (ex.text or "")[:300], "label": ex.label, "output": out[:500]}
                   for ex, out, p in zip(test, outputs, pred) if p is None]
    return {"pred": pred, "outputs": outputs, "unparseable": unparseable[:SHOWN_UNPARSEABLE],
            "unparseable_count": len(unparseable)}


def _workload(ctx: Any, models: EvalModels, timed: Sequence[Example], labels: list[str]) -> latency.Workload:
    """What a user waits for: the labels of one example scored (likelihood), or one answer generated."""
    spec, tok, device = ctx.job.evaluate, models.tokenizer, models.device
    indices = list(range(len(timed)))
    if spec.mode == "likelihood":
        cands = _candidates(ctx, models, timed, labels, None)
        return latency.Workload(
            single=lambda m, i: scoring.score_batch(m, [cands.prefixes[i]], [cands.conts[i]], tok.pad_token_id,
                                                    device),
            batched=lambda m: scoring.label_logits(m, cands, spec.batch_size, tok.pad_token_id, device),
            indices=indices, n_batched=len(timed),
            what="scoring every label of one example (one prompt pass, its labels together)")
    prompts = _prompts(tok, timed)
    return latency.Workload(
        single=lambda m, i: scoring.generate(m, tok, [prompts[i]], spec.max_new_tokens, 1, device),
        batched=lambda m: scoring.generate(m, tok, prompts, spec.max_new_tokens, spec.batch_size, device),
        indices=indices, n_batched=len(timed),
        what=f"generating one answer (greedy, at most {spec.max_new_tokens} new tokens)")


def _candidates(ctx: Any, models: EvalModels, examples: Sequence[Example], labels: list[str],
                outputs: Sequence[str] | None) -> scoring.Candidates:
    reasoning = [scoring.reasoning_before_final(o) for o in outputs] if outputs is not None else None
    return scoring.encode_candidates(models.tokenizer, examples, labels, ctx.job.train.max_seq_length, reasoning)


def _evaluate_variant(ctx: Any, models: EvalModels, variant: str, test: Sequence[Example],
                      labels: list[str]) -> dict[str, Any]:
    """One model on the test split. Mode both generates first, so labels are scored after its own reasoning."""
    spec = ctx.job.evaluate
    y = [ex.label for ex in test]
    out: dict[str, Any] = {}
    log.info("evaluating %s model on %d test examples (mode %s)", variant, len(test), spec.mode)
    with models.use(variant) as model:
        if spec.mode in ("generate", "both"):
            gen = _generation(ctx, model, models, test, labels)
            gen["metrics"] = classification_metrics(y, gen["pred"], labels, spec.critical_label)
            out.update(generation=gen, pred=gen["pred"])
        if spec.mode in ("likelihood", "both"):
            generated = out["generation"]["outputs"] if out else None
            cands = _candidates(ctx, models, test, labels, generated)
            logits = _likelihood(ctx, model, models, cands, variant)
            probs = calibration.probabilities(logits)
            out.update(logits=logits, probs=probs, pred=[labels[i] for i in probs.argmax(axis=1)])
    out["metrics"] = classification_metrics(y, out["pred"], labels, spec.critical_label)
    if "probs" in out:
        out["metrics"]["ece"] = calibration.expected_calibration_error(
            out["probs"], np.asarray([labels.index(t) for t in y]))
    return out


def _time_models(ctx: Any, models: EvalModels, per_model: dict[str, Any], test: Sequence[Example],
                 labels: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency and throughput of every model in its deployed form (after all metrics: see latency.deployed)."""
    spec = ctx.job.evaluate
    work = _workload(ctx, models, test[:spec.latency_examples], labels)
    ctx.report_progress(force=True, phase="timing")
    timings = latency.time_models(models, models.variants, work, spec.latency_rounds, ctx.should_stop)
    for variant, timing in timings.items():
        stats = latency.latency_stats(timing["single"], timing["batched"], work.n_batched)
        per_model[variant]["latency"] = stats
        per_model[variant]["metrics"].update(stats)
    changes = {ref: latency.latency_change(timings[ref], timings[TUNED], spec.bootstrap_samples, ctx.job.seed)
               for ref in (BASE, PREVIOUS) if ref in timings}
    return changes, latency.method_note(models, work, spec.latency_rounds, latency.load_average())


def _val_logits(ctx: Any, models: EvalModels, val: Sequence[Example], labels: list[str]) -> np.ndarray:
    """The tuned model's label scores on the validation split, made the same way as on the test split."""
    spec = ctx.job.evaluate
    with models.use(TUNED) as model:
        outputs = None
        if spec.mode == "both":
            outputs = scoring.generate(model, models.tokenizer, _prompts(models.tokenizer, val), spec.max_new_tokens,
                                       spec.batch_size, models.device, ctx.should_stop)
        cands = _candidates(ctx, models, val, labels, outputs)
        return scoring.label_logits(model, cands, spec.batch_size, models.tokenizer.pad_token_id, models.device,
                                    None, ctx.should_stop)


def evaluate_classification(ctx: Any, models: EvalModels, test: Sequence[Example], val: Sequence[Example],
                            labels: list[str]) -> dict[str, Any]:
    """Per-model metrics, the tuned model's calibration, A/B comparisons and the winner verdict."""
    spec = ctx.job.evaluate
    unknown = sorted({ex.label for ex in test} - set(labels))
    if unknown:
        labels = sorted(set(labels) | set(unknown))
    per_model = {v: _evaluate_variant(ctx, models, v, test, labels) for v in models.variants}
    y = [ex.label for ex in test]
    y_idx = np.asarray([labels.index(t) for t in y])

    calib = None
    if spec.mode in ("likelihood", "both"):
        val = [ex for ex in val if ex.label in labels]
        val_logits, val_idx = None, None
        if val:
            val_logits = _val_logits(ctx, models, val, labels)
            val_idx = np.asarray([labels.index(ex.label) for ex in val])
        calib = calibration.calibration_report(per_model[TUNED]["logits"], y_idx, val_logits, val_idx, len(labels),
                                               spec.calibration_min_val_rows, ctx.job.seed)
        log.info("temperature %.3f stored: %s", calib["temperature"], calib["reason"])

    changes, timing = _time_models(ctx, models, per_model, test, labels)
    comparisons = {ref: {**abtest.compare_classifiers(y, per_model[ref], per_model[TUNED], labels,
                                                      spec.bootstrap_samples, ctx.job.seed), **changes[ref]}
                   for ref in (BASE, PREVIOUS) if ref in per_model}
    rule = spec.winner_rule
    reference, winner, reason = abtest.judge(
        comparisons, rule.against,
        lambda c: abtest.decide_winner(c, rule.alpha, rule.critical_recall_may_drop, spec.critical_label))
    log.info("winner: %s (%s)", winner, reason)
    return {"task": "classification", "labels": labels, "y_true": y, "ids": [ex.id for ex in test],
            "models": per_model, "calibration": calib, "timing": timing, "comparisons": comparisons, "winner": winner,
            "winner_reason": reason, "reference": reference, "skipped": models.skipped}
