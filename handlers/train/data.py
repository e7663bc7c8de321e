"""Turn canonical Examples into token ids with a loss mask, and serve them in a resumable order.

Conversations are rendered with the tokenizer's chat template (``rendering``, tools included). The loss covers
only assistant turns (their content and end-of-turn token; not those with ``loss_weight: 0``), the completion
of prompt/completion rows and the label (with its thinking sections) of classification rows; plain ``text``
rows are learned whole.
The data order is a function of (seed, epoch) only, so the global step alone says where training is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.errors import StageFailed
from daemon.formats import Example
from handlers.train.rendering import Conversation, conversation, learned

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_split(path: Path) -> list[Example]:
    with open(path, encoding="utf-8") as fh:
        return [Example.from_json(line) for line in fh if line.strip()]


def _common_token_prefix_end(tokenizer: Any, full: str, offsets: list[tuple[int, int]], full_ids: list[int],
                             other: str) -> int:
    """Character position where ``other`` stops agreeing with ``full``, measured in whole tokens."""
    other_ids = tokenizer(other, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(full_ids), len(other_ids)) and full_ids[k] == other_ids[k]:
        k += 1
    return offsets[k - 1][1] if k else 0


def _assistant_spans(tokenizer: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans of every learned assistant answer (including its end-of-turn marker).

    An answer starts where the prompt for it (history + assistant header) ends, and ends where the conversation
    cut after it stops agreeing token by token with the full one (templates may add an end-of-text marker
    only at the very end of a conversation).
    """
    full = conv.render(tokenizer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for i, message in enumerate(conv.messages):
        if not learned(message):
            continue
        prompt = conv.render(tokenizer, i, add_generation_prompt=True)
        upto = conv.render(tokenizer, i + 1)
        end = len(full) if upto == full else _common_token_prefix_end(
            tokenizer, full, enc["offset_mapping"], enc["input_ids"], upto)
        while end > len(prompt) and full[end - 1].isspace():
            end -= 1
        if not full.startswith(prompt) or message["content"].strip() not in full[len(prompt):end]:
            raise StageFailed("the tokenizer's chat template does not render a conversation prefix by prefix, so "
                              "the assistant tokens cannot be located; use a base model whose template does, or "
                              "remove chat_template from its tokenizer_config.json to use the default format")
        spans.append((len(prompt), end))
    return full, spans


def _ids_and_mask(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= s < b for a, b in spans) for s, _e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_example(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Token ids and labels (IGNORE where no loss) for one example, truncated to ``max_len``."""
    conv = conversation(tokenizer, example)
    if conv is None:
        text = (tokenizer.bos_token or "") + (example.text or "") + (tokenizer.eos_token or "")
        ids, mask = _ids_and_mask(tokenizer, text, [(len(tokenizer.bos_token or ""), len(text))])
    else:
        text, spans = _assistant_spans(tokenizer, conv)
        ids, mask = _ids_and_mask(tokenizer, text, spans)
    if len(ids) > max_len:
        head_ids, head_mask = ids[:max_len], mask[:max_len]
        # keep the answer when cutting would lose it: drop the start of the prompt instead
        ids, mask = (head_ids, head_mask) if any(head_mask[1:]) else (ids[-max_len:], mask[-max_len:])
    return Encoded(ids, [t if m else IGNORE for t, m in zip(ids, mask)])


def encode_split(tokenizer: Any, examples: list[Example], max_len: int, name: str) -> list[Encoded]:
    out, dropped, truncated = [], 0, 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_len)
        if enc.loss_tokens == 0:
            dropped += 1
            continue
        truncated += len(enc.input_ids) == max_len
        out.append(enc)
    if dropped:
        log.warning("%s: %d row(s) have nothing to learn within max_seq_length %d and were skipped; "
                    "raise train.max_seq_length", name, dropped, max_len)
    if truncated:
        log.info("%s: %d row(s) reach max_seq_length %d and were truncated", name, truncated, max_len)
    return out


def collate(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


class StepBatches:
    """The micro-batches of every optimizer step, derived from (seed, epoch, step) alone."""

    def __init__(self, rows: list[Encoded], batch_size: int, accumulation: int, seed: int, pad_id: int):
        self.rows, self.batch_size, self.accumulation = rows, batch_size, accumulation
        self.seed, self.pad_id = seed, pad_id
        self.micro_per_epoch = -(-len(rows) // batch_size)
        self.steps_per_epoch = max(1, -(-self.micro_per_epoch // accumulation))
        self._perm_epoch, self._perm = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=gen).tolist(), epoch
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step within the epoch) of 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, index = self.position(step)
        perm = self._permutation(epoch)
        first = index * self.accumulation
        last = min(first + self.accumulation, self.micro_per_epoch)
        return [collate([self.rows[j] for j in perm[m * self.batch_size:(m + 1) * self.batch_size]], self.pad_id)
                for m in range(first, last)]


def eval_batches(rows: list[Encoded], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
