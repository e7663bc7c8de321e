"""Preference accuracy on held-out pairs: how often each model gives the chosen answer the higher mean
log-likelihood per token than the rejected one (the quantity the contrastive term trains), tuned vs base.

Held-out pairs are the test split's preference rows. A job that trains on augment-mined hard negatives has
none there (only the train split is augmented), so its test rows are paired with a mismatched answer: the
answer of another test row that differs from their own. Tuned and reference are compared like
classification accuracy: exact McNemar on the pairs one model gets right and the other wrong, and a paired
bootstrap 95% CI of the accuracy difference.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import numpy as np

from handlers.evaluate import abtest
from handlers.evaluate.generation import encode_for_loss, example_losses
from trainbox.rows import PAIR_KINDS, Example

log = logging.getLogger(__name__)
MISMATCHED = "test rows paired with another test row's different answer"
TEST_PAIRS = "preference pairs of the test split"


def _sides(pair: Example) -> tuple[Example, Example]:
    return tuple(Example(id=pair.id, format="messages", messages=[*(pair.messages or []),  # type: ignore[return-value]
                                                                  {"role": "assistant", "content": answer}])
                 for answer in (pair.chosen or "", pair.rejected or ""))


def _answer_of(ex: Example) -> tuple[list[dict[str, str]], str] | None:
    from handlers.modelio import example_messages

    messages = example_messages(ex)
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]


def mismatched_pairs(test: Sequence[Example], seed: int) -> list[Example]:
    """Each test row with another test row's answer as the rejected side (one that differs from its own)."""
    rows = [(ex, split) for ex in test if ex.kind not in PAIR_KINDS and (split := _answer_of(ex)) is not None]
    others = list(range(len(rows)))
    random.Random(seed).shuffle(others)
    pairs = []
    for i, (ex, (prompt, answer)) in enumerate(rows):
        rejected = next((rows[j][1][1] for j in others[i:] + others[:i] if rows[j][1][1] != answer), None)
        if rejected is not None:
            pairs.append(Example(id=ex.id, format="messages", messages=prompt, kind="hard_negative",
                                 source_id=ex.id, chosen=answer, rejected=rejected))
    return pairs


def held_out_pairs(ctx: Any, test: Sequence[Example]) -> tuple[list[Example], str | None]:
    """The pairs to score and where they come from (none: the job has no preference data)."""
    pairs = [ex for ex in test if ex.kind in PAIR_KINDS]
    if pairs:
        return pairs, TEST_PAIRS
    job = ctx.job
    if "augment" in job.stages and "hard_negative" in job.augment.techniques and job.train.loss_weights.contrastive:
        return mismatched_pairs(test, job.seed), MISMATCHED
    return [], None


def pair_wins(model: Any, tokenizer: Any, pairs: Sequence[Example], max_length: int, batch_size: int,
              device: Any, should_stop: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: chosen beats rejected (mean log-likelihood per answer token), and the margin between them."""
    sides = [_sides(p) for p in pairs]
    items = encode_for_loss(tokenizer, [s for pair in sides for s in pair], max_length)
    sums, counts = example_losses(model, items, batch_size, tokenizer.pad_token_id, device, should_stop)
    mean_logp = -(sums / np.maximum(counts, 1)).reshape(-1, 2)
    margin = mean_logp[:, 0] - mean_logp[:, 1]
    return margin > 0, margin


def evaluate_preferences(ctx: Any, models: Any, test: Sequence[Example]) -> dict[str, Any] | None:
    """Preference accuracy per model and paired comparisons against the reference models (None: no pairs)."""
    from handlers.evaluate.models import BASE, PREVIOUS, TUNED

    pairs, source = held_out_pairs(ctx, test)
    if not pairs:
        return None
    spec = ctx.job.evaluate
    per_model: dict[str, dict[str, Any]] = {}
    for variant in models.variants:
        ctx.report_progress(force=True, phase=f"preference pairs {variant}")
        with models.use(variant) as model:
            wins, margin = pair_wins(model, models.tokenizer, pairs, ctx.job.train.max_seq_length, spec.batch_size,
                                     models.device, ctx.should_stop)
        per_model[variant] = {"accuracy": float(wins.mean()), "mean_margin": float(margin.mean()),
                              "correct": wins.tolist()}
        log.info("preference accuracy of the %s model: %.3f on %d pairs (%s)", variant, wins.mean(), len(pairs),
                 source)
    comparisons = {}
    for ref in (BASE, PREVIOUS):
        if ref in per_model:
            a, b = per_model[ref]["correct"], per_model[TUNED]["correct"]
            comparisons[ref] = {"accuracy": {"ref": per_model[ref]["accuracy"], "new": per_model[TUNED]["accuracy"]},
                                "mcnemar": abtest.mcnemar_exact(a, b),
                                "accuracy_diff": abtest.paired_accuracy_ci(a, b, spec.bootstrap_samples, ctx.job.seed)}
    return {"pairs": len(pairs), "source": source, "models": per_model, "comparisons": comparisons,
            "ids": [p.id for p in pairs]}
