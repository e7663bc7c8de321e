"""Generation datasets: eval loss on the answer tokens, perplexity, task metrics of generated answers, samples."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from handlers.evaluate import textmetrics
from handlers.modelio import example_messages, prompt_text, render_chat
from trainbox.errors import StopRequested
from trainbox.rows import Example

log = logging.getLogger(__name__)


@dataclass
class LossItem:
    """Token ids of one example and how many trailing tokens are scored (the answer, or all of a text row)."""

    ids: list[int]
    scored: int


def prompt_and_reference(tokenizer: Any, ex: Example) -> tuple[str, str]:
    """What the model is asked and what it should answer: the last assistant turn, or the second half of text."""
    messages = example_messages(ex)
    if messages:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return prompt_text(tokenizer, messages[:last + 1]), messages[last]["content"]
    words = (ex.text or "").split(" ")
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]) + " ", " ".join(words[cut:])


def _shown_prompt(ex: Example, rendered: str) -> str:
    """What a reader of the report should see as the prompt: the last user turn, not the chat template."""
    users = [m["content"] for m in (example_messages(ex) or []) if m["role"] == "user"]
    return users[-1] if users else rendered


def encode_for_loss(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[LossItem]:
    items = []
    for ex in examples:
        messages = example_messages(ex)
        if messages:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt, _ = prompt_and_reference(tokenizer, ex)
            full = render_chat(tokenizer, messages[:last + 1]).rstrip()  # as trained: no loss on trailing space
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            scored = len(ids) - prompt_len
        else:
            ids = tokenizer(ex.text or "", add_special_tokens=True)["input_ids"]
            scored = len(ids) - 1
        if len(ids) > max_length:
            ids = ids[-max_length:]
        items.append(LossItem(ids, max(1, min(scored, len(ids) - 1))))
    return items


def example_losses(model: Any, items: Sequence[LossItem], batch_size: int, pad_id: int, device: Any,
                   should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-example summed negative log-likelihood of the scored tokens, and their token counts."""
    import torch

    sums, counts = np.zeros(len(items)), np.zeros(len(items), dtype=int)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise StopRequested("evaluation stopped; it starts over when the job resumes")
            batch = order[start:start + batch_size]
            width = max(len(items[i].ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):  # right padding: the scored tokens are the last real ones
                ids[row, :len(items[i].ids)] = torch.tensor(items[i].ids)
                mask[row, :len(items[i].ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(logits.device),
                                                    reduction="none").cpu()
            for row, i in enumerate(batch):
                n = len(items[i].ids)
                sums[i] = float(nll[row, n - 1 - items[i].scored:n - 1].sum())
                counts[i] = items[i].scored
    return sums, counts


def loss_summary(sums: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Two losses, named apart: ``eval_loss`` weights every scored token alike (the headline, perplexity and the
    winner rule use it); ``example_mean_loss`` weights every example alike (the mean of ``per_example``, which
    the paired test compares)."""
    eval_loss = float(sums.sum() / max(1, counts.sum()))
    per_example = sums / np.maximum(counts, 1)
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0)), "tokens": int(counts.sum()),
            "example_mean_loss": float(per_example.mean()) if len(per_example) else None,
            "per_example": per_example.tolist()}


def _answer_scores(per_model: dict[str, Any], references: Sequence[str], n: int) -> None:
    """Task metrics of each model's first ``n`` answers against the references (in place)."""
    for result in per_model.values():
        scores = textmetrics.score_answers(result["outputs"][:n], references[:n])
        result["answer_scores"] = scores
        result["metrics"].update(textmetrics.means(scores), answered=n)


def evaluate_generation(ctx: Any, models: Any, test: Sequence[Example]) -> dict[str, Any]:
    """Eval losses, and task metrics of generated answers, per model; paired tests against the references;
    answers side by side with the references."""
    from handlers.evaluate import abtest
    from handlers.evaluate.models import BASE, PREVIOUS, TUNED
    from handlers.evaluate.scoring import generate

    spec = ctx.job.evaluate
    tok = models.tokenizer
    items = encode_for_loss(tok, test, ctx.job.train.max_seq_length)
    n_scored = min(spec.generate_examples, len(test))
    answered = list(test[:max(n_scored, spec.samples)])
    prompts = [prompt_and_reference(tok, ex) for ex in answered]
    per_model: dict[str, Any] = {}
    for variant in models.variants:
        log.info("evaluating %s model on %d test examples (eval loss; %d answers generated)", variant, len(test),
                 len(answered))
        with models.use(variant) as model:
            ctx.report_progress(force=True, phase=f"eval loss {variant}")
            sums, counts = example_losses(model, items, spec.batch_size, tok.pad_token_id, models.device,
                                          ctx.should_stop)
            ctx.report_progress(force=True, phase=f"generating {variant}")
            outputs = generate(model, tok, [p for p, _ in prompts], spec.max_new_tokens, spec.batch_size,
                               models.device, ctx.should_stop) if answered else []
        per_model[variant] = {"metrics": loss_summary(sums, counts), "outputs": outputs}
    references = [ref for _, ref in prompts]
    if n_scored:
        _answer_scores(per_model, references, n_scored)
    samples = [{"id": ex.id, "prompt": _shown_prompt(ex, prompt)[-600:], "reference": ref,
                **{v: per_model[v]["outputs"][i] for v in per_model},
                "chrf": {v: per_model[v]["answer_scores"]["chrf"][i] for v in per_model if i < n_scored}}
               for i, (ex, (prompt, ref)) in enumerate(zip(answered[:spec.samples], prompts))]
    comparisons = {}
    for ref in (BASE, PREVIOUS):
        if ref in per_model:
            comparisons[ref] = abtest.compare_losses(per_model[ref]["metrics"], per_model[TUNED]["metrics"])
            if n_scored:
                comparisons[ref]["answers"] = abtest.compare_scores(
                    per_model[ref]["answer_scores"], per_model[TUNED]["answer_scores"], spec.bootstrap_samples,
                    ctx.job.seed)
    rule = spec.winner_rule
    reference, winner, reason = abtest.judge(comparisons, rule.against,
                                             lambda c: abtest.decide_loss_winner(c, rule.alpha))
    log.info("winner: %s (%s)", winner, reason)
    return {"task": "generation", "models": per_model, "samples": samples, "comparisons": comparisons,
            "answered": n_scored, "ids": [ex.id for ex in answered[:n_scored]], "references": references[:n_scored],
            "winner": winner, "winner_reason": reason, "reference": reference, "skipped": models.skipped}
