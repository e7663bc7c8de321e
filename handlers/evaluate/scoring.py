"""Label scoring for classification: batched log-likelihood of each candidate label, and generation with
``<final>`` parsing. One forward pass scores a whole batch of (example, label) continuations.
"""
from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from handlers.modelio import render_chat
from trainbox.errors import StageFailed, StopRequested
from trainbox.rows import Example, classification_target

log = logging.getLogger(__name__)
FINAL_RE = re.compile(r"<final>\s*(.*?)\s*(?:</final>|$)", re.DOTALL)
Progress = Callable[[int, int], None]


@dataclass
class Candidates:
    """Per example: the tokens every label sequence shares (prompt), and each label's continuation tokens."""

    prefixes: list[list[int]]
    conts: list[list[list[int]]]  # [example][label] -> continuation token ids (at least one)
    truncated: int = 0

    @property
    def n_examples(self) -> int:
        return len(self.prefixes)

    @property
    def n_labels(self) -> int:
        return len(self.conts[0]) if self.conts else 0

    def subset(self, examples: Sequence[int]) -> "Candidates":
        return Candidates([self.prefixes[i] for i in examples], [self.conts[i] for i in examples])

    def sequences(self) -> tuple[list[list[int]], list[int]]:
        """Every (example, label) sequence in full, row-major, and its continuation length (the plain form)."""
        rows = [(p + c, len(c)) for p, cs in zip(self.prefixes, self.conts) for c in cs]
        return [r for r, _ in rows], [n for _, n in rows]


def candidate_text(label: str, with_think: bool) -> str:
    """The scored continuation: the label as trained; think-trained rows score the ``<final>`` section only
    (their reasoning is not known before generation)."""
    return f"<final>{label}</final>" if with_think else classification_target(label, None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reasoning_before_final(output: str) -> str | None:
    """The think sections a generated answer wrote before ``<final>`` (None when it wrote none)."""
    head, found, _ = output.partition("<final>")
    return head if found and "<think-" in head else None


def encode_candidates(tokenizer: Any, examples: Sequence[Example], labels: list[str], max_length: int,
                      reasoning: Sequence[str | None] | None = None) -> Candidates:
    """Chat-render every example with every candidate label and split off the tokens all labels share.

    ``reasoning`` (mode both): a model's own generated think sections per example; its labels are then scored
    after that reasoning, as the model decides when it generates. Sequences longer than ``max_length`` lose the
    start of their prompt, never the continuation.
    """
    prefixes, conts, truncated = [], [], 0
    for i, ex in enumerate(examples):
        user = [{"role": "user", "content": ex.text or ""}]
        before = reasoning[i] if reasoning else None
        fulls = []
        for label in labels:
            answer = f"{before}<final>{label}</final>" if before else candidate_text(label, bool(ex.think))
            messages = [*user, {"role": "assistant", "content": answer}]
            # rstrip: training stops its loss at the end-of-turn token, not at the newline after it
            fulls.append(tokenizer(render_chat(tokenizer, messages).rstrip(), add_special_tokens=False)["input_ids"])
        # score only where the label sequences differ: tokens they all share add the same log-probability to
        # every label and cannot change the label probabilities (this also copes with tokens that merge across
        # the prompt/answer boundary)
        shared = min(min(_common_prefix(fulls[0], f), len(f) - 1) for f in fulls)
        if shared < 1:
            raise StageFailed("the chat template renders nothing before the answer; label scoring needs a prompt")
        longest = max(len(f) for f in fulls)
        drop = max(0, min(longest - max_length, shared - 1))
        truncated += drop > 0
        prefixes.append(fulls[0][drop:shared])
        conts.append([f[shared:] for f in fulls])
    if truncated:
        log.warning("%d examples were longer than %d tokens and lost the start of their prompt",
                    truncated, max_length)
    return Candidates(prefixes, conts, truncated)


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_keyword(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output); support both."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def score_batch(model: Any, prefixes: Sequence[list[int]], conts: Sequence[list[list[int]]], pad_id: int,
                device: Any) -> np.ndarray:
    """(examples, labels) summed continuation log-probabilities. The prompts run once; their KV cache is
    repeated for every label and only the short continuations run again."""
    import torch

    n, k = len(prefixes), len(conts[0])
    ids, mask, positions = (t.to(device) for t in _left_padded(prefixes, pad_id))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each continuation's first token
    flat = [c for cs in conts for c in cs]
    first_ids = torch.tensor([c[0] for c in flat], device=first.device)
    scores = first.repeat_interleave(k, dim=0).gather(1, first_ids[:, None]).squeeze(1)
    rest = max(len(c) for c in flat) - 1
    if rest > 0:
        cache_kw = _cache_keyword(model)
        cache = getattr(out, cache_kw, None)
        cache.reorder_cache(torch.arange(n, device=ids.device).repeat_interleave(k))
        step_ids = torch.full((n * k, rest), pad_id, dtype=torch.long)
        targets = torch.full((n * k, rest), pad_id, dtype=torch.long)
        step_mask = torch.zeros((n * k, rest), dtype=torch.long)
        for r, c in enumerate(flat):  # right padding: a continuation's real tokens come first
            step_ids[r, :len(c) - 1] = torch.tensor(c[:-1])
            targets[r, :len(c) - 1] = torch.tensor(c[1:])
            step_mask[r, :len(c) - 1] = 1
        full_mask = torch.cat([mask.repeat_interleave(k, dim=0), step_mask.to(device)], dim=1)
        step_pos = positions[:, -1:].repeat_interleave(k, dim=0) + 1 + torch.arange(rest, device=device)
        logits = model(input_ids=step_ids.to(device), attention_mask=full_mask, position_ids=step_pos,
                       use_cache=True, **{cache_kw: cache}).logits.float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.to(device)[..., None]).squeeze(-1)
        scores = scores + (token_logp * step_mask.to(device)).sum(-1)
    return scores.detach().float().cpu().numpy().reshape(n, k)


def sequence_logprob(model: Any, rows: list[list[int]], conts: list[int], pad_id: int, device: Any) -> np.ndarray:
    """The plain way, without a shared prompt: sum of log-probabilities of each full row's last ``cont``
    tokens. The benchmark's baseline and the tests' cross-check."""
    import torch

    ids, mask, positions = (t.to(device) for t in _left_padded(rows, pad_id))
    keep = max(conts) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, ids.shape[1] - keep + 1:].unsqueeze(-1)).squeeze(-1)
    n_cont = torch.tensor(conts, device=token_logp.device).unsqueeze(1)
    in_cont = torch.arange(keep - 1, device=token_logp.device).unsqueeze(0) >= (keep - 1 - n_cont)
    return (token_logp * in_cont).sum(-1).detach().cpu().numpy()


def label_logits(model: Any, cands: Candidates, batch_size: int, pad_id: int, device: Any,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """(n_examples, n_labels) summed label log-likelihoods, ``batch_size`` examples per forward pass.

    Examples are sorted by prompt length so a batch holds similar lengths and little padding.
    """
    import torch

    order = sorted(range(cands.n_examples), key=lambda i: len(cands.prefixes[i]))
    scores = np.empty((cands.n_examples, cands.n_labels))
    with torch.inference_mode():
        for start in range(0, len(order), max(1, batch_size)):
            if should_stop is not None and should_stop():
                raise StopRequested("evaluation stopped; it starts over when the job resumes")
            batch = order[start:start + max(1, batch_size)]
            scores[batch] = score_batch(model, [cands.prefixes[i] for i in batch], [cands.conts[i] for i in batch],
                                        pad_id, device)
            if progress is not None:
                progress(start + len(batch), cands.n_examples)
    return scores


def parse_final(text: str, labels: Sequence[str]) -> str | None:
    """The label in a ``<final>`` section, or a bare label answer; None when it names no known label."""
    by_upper = {label.upper(): label for label in labels}
    match = FINAL_RE.search(text)
    answer = match.group(1) if match else text
    return by_upper.get(answer.strip().strip(".").upper())


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             device: Any, should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches); special tokens are dropped from the text."""
    import torch

    pad_id = tokenizer.pad_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise StopRequested("evaluation stopped; it starts over when the job resumes")
            batch = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for row, i in enumerate(batch):
                out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return out
