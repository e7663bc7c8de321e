"""Label scoring for classification: batched log-likelihood of each candidate label, and generation with
``<final>`` parsing. One forward pass scores a whole batch of (example, label) continuations.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from daemon.errors import StopRequested
from daemon.formats import Example, classification_target
from handlers.modelio import prompt_text, render_chat

log = logging.getLogger(__name__)
FINAL_RE = re.compile(r"<final>\s*(.*?)\s*(?:</final>|$)", re.DOTALL)
Progress = Callable[[int, int], None]


@dataclass
class Candidates:
    """Token ids of every (example, label) sequence, row-major: example i, label k at ``i * n_labels + k``."""

    ids: list[list[int]]
    cont: list[int]  # tokens at the end of each sequence that belong to the label continuation
    n_labels: int
    truncated: int = 0

    @property
    def n_examples(self) -> int:
        return len(self.ids) // self.n_labels

    def subset(self, examples: Sequence[int]) -> "Candidates":
        rows = [i * self.n_labels + k for i in examples for k in range(self.n_labels)]
        return Candidates([self.ids[r] for r in rows], [self.cont[r] for r in rows], self.n_labels)


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


def encode_candidates(tokenizer: Any, examples: Sequence[Example], labels: list[str],
                      max_length: int) -> Candidates:
    """Chat-render every example with every candidate label; keep the last ``max_length`` tokens."""
    ids: list[list[int]] = []
    cont: list[int] = []
    truncated = 0
    for ex in examples:
        user = [{"role": "user", "content": ex.text or ""}]
        prompt_ids = tokenizer(prompt_text(tokenizer, [*user, {"role": "assistant", "content": ""}]),
                               add_special_tokens=False)["input_ids"]
        for label in labels:
            messages = [*user, {"role": "assistant", "content": candidate_text(label, bool(ex.think))}]
            # rstrip: training stops its loss at the end-of-turn token, not at the newline after it
            full = tokenizer(render_chat(tokenizer, messages).rstrip(), add_special_tokens=False)["input_ids"]
            n_cont = len(full) - _common_prefix(prompt_ids, full)
            if len(full) > max_length:
                full = full[-max_length:]  # keep the continuation; the start of a long prompt is dropped
                truncated += 1
            ids.append(full)
            cont.append(min(n_cont, len(full) - 1))
    if truncated:
        log.warning("%d scored sequences were longer than %d tokens and lost the start of their prompt",
                    truncated, max_length)
    return Candidates(ids, cont, len(labels), truncated)


def _forward_batch(model: Any, rows: list[list[int]], conts: list[int], pad_id: int, device: Any) -> np.ndarray:
    """Sum of log-probabilities of each row's last ``cont`` tokens (left-padded, logits only at the end)."""
    import torch

    width = max(len(r) for r in rows)
    keep = max(conts) + 1
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, width - keep + 1:]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    n_cont = torch.tensor(conts, device=token_logp.device).unsqueeze(1)
    in_cont = torch.arange(keep - 1, device=token_logp.device).unsqueeze(0) >= (keep - 1 - n_cont)
    return (token_logp * in_cont).sum(-1).detach().cpu().numpy()


def label_logits(model: Any, cands: Candidates, batch_size: int, pad_id: int, device: Any,
                 progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """(n_examples, n_labels) summed label log-likelihoods; ``batch_size`` examples (all labels) per forward.

    Sequences are sorted by length so a batch holds similar lengths and little padding.
    """
    import torch

    order = sorted(range(len(cands.ids)), key=lambda r: len(cands.ids[r]))
    per_batch = max(1, batch_size) * cands.n_labels
    scores = np.empty(len(cands.ids))
    with torch.inference_mode():
        for start in range(0, len(order), per_batch):
            if should_stop is not None and should_stop():
                raise StopRequested("evaluation stopped; it starts over when the job resumes")
            batch = order[start:start + per_batch]
            scores[batch] = _forward_batch(model, [cands.ids[r] for r in batch], [cands.cont[r] for r in batch],
                                           pad_id, device)
            if progress is not None:
                progress(min(start + per_batch, len(order)) // cands.n_labels, cands.n_examples)
    return scores.reshape(cands.n_examples, cands.n_labels)


def single_example_latencies(model: Any, cands: Candidates, examples: Sequence[int], pad_id: int,
                             device: Any) -> list[float]:
    """Seconds to classify each of ``examples`` alone (one request: its labels in one forward)."""
    import torch

    out = []
    with torch.inference_mode():
        if examples:  # warm-up: the first call pays for lazy initialisation, not for the example
            first = cands.subset([examples[0]])
            _forward_batch(model, first.ids, first.cont, pad_id, device)
        for i in examples:
            one = cands.subset([i])
            start = time.perf_counter()
            _forward_batch(model, one.ids, one.cont, pad_id, device)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return out


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
