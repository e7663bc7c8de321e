"""Classification evaluation: score every model on the test split, calibrate the tuned one, A/B them."""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from daemon.formats import Example
from handlers.evaluate import abtest, calibration, scoring
from handlers.evaluate.metrics import classification_metrics, latency_stats
from handlers.evaluate.models import BASE, PREVIOUS, TUNED, EvalModels
from handlers.modelio import prompt_text

log = logging.getLogger(__name__)
SHOWN_UNPARSEABLE = 50


def _prompts(tokenizer: Any, examples: Sequence[Example]) -> list[str]:
    return [prompt_text(tokenizer, [{"role": "user", "content": ex.text or ""},
                                    {"role": "assistant", "content": ""}]) for ex in examples]


def _likelihood(ctx: Any, model: Any, models: EvalModels, cands: scoring.Candidates, variant: str,
                lat_idx: list[int]) -> tuple[np.ndarray, dict[str, Any]]:
    spec, pad = ctx.job.evaluate, models.tokenizer.pad_token_id

    def progress(done: int, total: int) -> None:
        ctx.report_progress(phase=f"scoring {variant}", step=done, total_steps=total)

    # warm-up batch: the first calls on a model pay for lazy initialisation, which is not throughput
    scoring.label_logits(model, cands.subset(range(min(spec.batch_size, cands.n_examples))), spec.batch_size, pad,
                         models.device)
    start = time.perf_counter()
    logits = scoring.label_logits(model, cands, spec.batch_size, pad, models.device, progress, ctx.should_stop)
    seconds = time.perf_counter() - start
    latencies = scoring.single_example_latencies(model, cands, lat_idx, pad, models.device)
    return logits, latency_stats(latencies, cands.n_examples, seconds)


def _generation(ctx: Any, model: Any, models: EvalModels, test: Sequence[Example], labels: list[str],
                lat_idx: list[int]) -> dict[str, Any]:
    spec = ctx.job.evaluate
    prompts = _prompts(models.tokenizer, test)
    ctx.report_progress(force=True, phase="generating")
    start = time.perf_counter()
    outputs = scoring.generate(model, models.tokenizer, prompts, spec.max_new_tokens, spec.batch_size,
                               models.device, ctx.should_stop)
    seconds = time.perf_counter() - start
    latencies = []
    for i in lat_idx:
        t0 = time.perf_counter()
        scoring.generate(model, models.tokenizer, [prompts[i]], spec.max_new_tokens, 1, models.device)
        latencies.append(time.perf_counter() - t0)
    pred = [scoring.parse_final(o, labels) for o in outputs]
    unparseable = [{"id": ex.id, "text": (ex.text or "")[:300], "label": ex.label, "output": out[:500]}
                   for ex, out, p in zip(test, outputs, pred) if p is None]
    return {"pred": pred, "outputs": outputs, "latency": latency_stats(latencies, len(test), seconds),
            "unparseable": unparseable[:SHOWN_UNPARSEABLE], "unparseable_count": len(unparseable)}


def _candidates(ctx: Any, models: EvalModels, examples: Sequence[Example], labels: list[str],
                outputs: Sequence[str] | None) -> scoring.Candidates:
    reasoning = [scoring.reasoning_before_final(o) for o in outputs] if outputs is not None else None
    return scoring.encode_candidates(models.tokenizer, examples, labels, ctx.job.train.max_seq_length, reasoning)


def _evaluate_variant(ctx: Any, models: EvalModels, variant: str, test: Sequence[Example], labels: list[str],
                      lat_idx: list[int]) -> dict[str, Any]:
    """One model on the test split. Mode both generates first, so labels are scored after its own reasoning."""
    spec = ctx.job.evaluate
    y = [ex.label for ex in test]
    out: dict[str, Any] = {}
    log.info("evaluating %s model on %d test examples (mode %s)", variant, len(test), spec.mode)
    with models.use(variant) as model:
        if spec.mode in ("generate", "both"):
            gen = _generation(ctx, model, models, test, labels, lat_idx)
            gen["metrics"] = classification_metrics(y, gen["pred"], labels, spec.critical_label)
            out.update(generation=gen, pred=gen["pred"], latency=gen["latency"])
        if spec.mode in ("likelihood", "both"):
            generated = out["generation"]["outputs"] if out else None
            cands = _candidates(ctx, models, test, labels, generated)
            # mode both: an answer costs its generation; the scoring time is not what a user waits for
            logits, latency = _likelihood(ctx, model, models, cands, variant, lat_idx if generated is None else [])
            probs = calibration.probabilities(logits)
            out.update(logits=logits, probs=probs, pred=[labels[i] for i in probs.argmax(axis=1)])
            out.setdefault("latency", latency)
    out["metrics"] = classification_metrics(y, out["pred"], labels, spec.critical_label)
    if "probs" in out:
        out["metrics"]["ece"] = calibration.expected_calibration_error(
            out["probs"], np.asarray([labels.index(t) for t in y]))
    out["metrics"].update(out["latency"])
    return out


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
    lat_idx = list(range(min(spec.latency_examples, len(test))))
    per_model = {v: _evaluate_variant(ctx, models, v, test, labels, lat_idx) for v in models.variants}
    y = [ex.label for ex in test]
    y_idx = np.asarray([labels.index(t) for t in y])

    calib = None
    if spec.mode in ("likelihood", "both"):
        val = [ex for ex in val if ex.label in labels]
        val_logits, val_idx = None, None
        if val:
            val_logits = _val_logits(ctx, models, val, labels)
            val_idx = np.asarray([labels.index(ex.label) for ex in val])
        else:
            log.warning("the validation split is empty: temperature scaling is skipped (T = 1)")
        calib = calibration.calibration_report(per_model[TUNED]["logits"], y_idx, val_logits, val_idx, len(labels))

    comparisons = {ref: abtest.compare_classifiers(y, per_model[ref], per_model[TUNED], labels,
                                                   spec.bootstrap_samples, ctx.job.seed)
                   for ref in (BASE, PREVIOUS) if ref in per_model}
    rule = spec.winner_rule
    reference, winner, reason = abtest.judge(
        comparisons, rule.against,
        lambda c: abtest.decide_winner(c, rule.alpha, rule.critical_recall_may_drop, spec.critical_label))
    log.info("winner: %s (%s)", winner, reason)
    return {"task": "classification", "labels": labels, "y_true": y, "ids": [ex.id for ex in test],
            "models": per_model, "calibration": calib, "comparisons": comparisons, "winner": winner,
            "winner_reason": reason, "reference": reference, "skipped": models.skipped}
