"""Turn canonical Examples into token ids with a loss mask, and serve them in a resumable order.

Conversations are rendered with the tokenizer's chat template (``rendering``, tools included). The loss covers
only assistant turns (their content and end-of-turn token; not those with ``loss_weight: 0``), the completion
of prompt/completion rows and the label (with its thinking sections) of classification rows; plain ``text``
rows are learned whole. Every row carries the loss term its ``kind`` trains (``TERMS``); a preference pair
is one unit of two sequences (chosen, then rejected) that always share a micro-batch.
The data order is a function of (seed, epoch) only, so the global step alone says where training is.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handlers.modelio import example_messages
from handlers.train.rendering import Conversation, conversation, learned
from trainbox.errors import StageFailed
from trainbox.rows import LOSS_TERM_OF_KIND, PAIR_KINDS, Example

log = logging.getLogger(__name__)

IGNORE = -100
TERMS = ("generation", "style", "relationship")  # token-loss terms; a row's ``term`` is its index here
NOT_A_TARGET = len(TERMS)  # a pair's answer that no token term learns (always the rejected one)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    term: int = 0  # index into TERMS of the term its label tokens train, or NOT_A_TARGET
    rejected: "Encoded | None" = None  # on the chosen side of a preference pair: the answer it must beat

    @property
    def loss_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)

    @property
    def sequences(self) -> list["Encoded"]:
        """What goes into a micro-batch for this unit: the row, or a pair's chosen and rejected sequences."""
        return [self] if self.rejected is None else [self, self.rejected]

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    @property
    def width(self) -> int:
        return max(len(s.input_ids) for s in self.sequences)


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


def _turns(messages: list[dict[str, Any]] | None) -> str:
    return json.dumps([(m["role"], m["content"]) for m in messages or []], ensure_ascii=False)


def _pair_sides(ex: Example) -> tuple[Example, Example]:
    """The chosen and the rejected conversation of a pair row; earlier assistant turns are context, not learned."""
    prompt = [{**m, "loss_weight": 0} if m["role"] == "assistant" else m for m in ex.messages or []]
    return tuple(Example(id=ex.id, format="messages", meta=ex.meta,  # type: ignore[return-value]
                         messages=[*prompt, {"role": "assistant", "content": answer}])
                 for answer in (ex.chosen or "", ex.rejected or ""))


def encode_split(tokenizer: Any, examples: list[Example], max_len: int, name: str,
                 learn_chosen: bool = True) -> list[Encoded]:
    """Encode a split: each row with its loss term, each pair as one unit (chosen carrying rejected).

    A pair's chosen answer is also a generation target when ``learn_chosen`` and the same prompt and answer
    is not already a row of the split (an augment-mined hard negative's chosen side is its source row)."""
    targets = {_turns(example_messages(ex)) for ex in examples if ex.kind not in PAIR_KINDS}
    out, dropped, truncated = [], 0, 0
    for ex in examples:
        if ex.kind in PAIR_KINDS:
            chosen_ex, rejected_ex = _pair_sides(ex)
            learned = learn_chosen and _turns(chosen_ex.messages) not in targets
            enc = encode_example(tokenizer, chosen_ex, max_len)
            enc.term = TERMS.index("generation") if learned else NOT_A_TARGET
            enc.rejected = encode_example(tokenizer, rejected_ex, max_len)
            enc.rejected.term = NOT_A_TARGET
        else:
            enc = encode_example(tokenizer, ex, max_len)
            enc.term = TERMS.index(LOSS_TERM_OF_KIND.get(ex.kind, "generation"))
        if any(s.loss_tokens == 0 for s in enc.sequences):
            dropped += 1
            continue
        truncated += any(len(s.input_ids) == max_len for s in enc.sequences)
        out.append(enc)
    if dropped:
        log.warning("%s: %d row(s) have nothing to learn within max_seq_length %d and were skipped; "
                    "raise train.max_seq_length", name, dropped, max_len)
    if truncated:
        log.info("%s: %d row(s) reach max_seq_length %d and were truncated", name, truncated, max_len)
    return out


def _pairs(units: list[Encoded]) -> torch.Tensor:
    """(pairs, 2) sequence numbers of each pair's chosen and rejected sequence in the flattened units."""
    pairs, seq = [], 0
    for u in units:
        if u.rejected is not None:
            pairs.append((seq, seq + 1))
        seq += len(u.sequences)
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def collate(units: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch, one sequence per row: input_ids, attention_mask, labels, terms (per token), seq
    (the sequence number of each token) and pairs."""
    rows = [s for u in units for s in u.sequences]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    terms = torch.full((len(rows), width), NOT_A_TARGET, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        attn[i, :n] = 1
        terms[i, :n] = r.term
    seq = torch.arange(len(rows))[:, None].expand(-1, width).contiguous()
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "terms": terms, "seq": seq,
            "pairs": _pairs(units)}


def collate_packed(units: list[Encoded]) -> dict[str, torch.Tensor]:
    """All rows back to back in one sequence, without padding: input_ids, position_ids, labels, and terms, seq
    and pairs as in ``collate``.

    Position ids restart at 0 with every row; transformers reads the restarts as sequence boundaries
    (block-diagonal mask for SDPA/eager, ``cu_seqlens`` for FlashAttention), so no row attends to another.
    The first label of each row is IGNORE because the token before it belongs to the previous row; the
    padded path never learns a row's first token either (the loss starts at position 1).
    """
    ids, labels, positions, terms, seq = [], [], [], [], []
    for i, r in enumerate(s for u in units for s in u.sequences):
        n = len(r.input_ids)
        ids += r.input_ids
        labels += [IGNORE, *r.labels[1:]]
        positions += range(n)
        terms += [r.term] * n
        seq += [i] * n
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]), "terms": torch.tensor([terms]), "seq": torch.tensor([seq]),
            "pairs": _pairs(units)}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def group_by_tokens(rows: list[Encoded], budget: int, packed: bool) -> list[list[Encoded]]:
    """Consecutive groups of ``rows`` that each fit ``budget`` tokens (a longer row goes alone).

    Packed, a group costs the sum of its row lengths; padded, rows are first sorted by length (stable, so
    the grouping stays a function of the rows alone) and a group costs rows x its longest row. A pair
    counts as its two sequences and is never split.
    """
    if not packed:
        rows = sorted(rows, key=lambda r: r.width)
    groups: list[list[Encoded]] = []
    used = widest = count = 0
    for r in rows:
        n, k = r.width, len(r.sequences)
        cost = used + r.tokens if packed else (count + k) * max(widest, n)
        if groups and cost <= budget:
            groups[-1].append(r)
            used, widest, count = used + r.tokens, max(widest, n), count + k
        else:
            groups.append([r])
            used, widest, count = r.tokens, n, k
    return groups


class StepBatches:
    """The micro-batches of every optimizer step, derived from (seed, epoch, step) alone.

    A step takes the next ``batch_size * accumulation`` rows of the epoch's permutation and splits them into
    micro-batches of at most ``token_budget`` tokens (default ``batch_size * max row length``, the padded
    worst case), packed without padding or, where the model cannot pack, padded in length-sorted groups.
    Which rows a step sees never depends on packing or the budget, only how they are grouped for the forward.
    With several ranks (``world`` > 1) each takes every ``world``-th row of the step (``shard_rows``), so the
    step's rows, and with them the global batch, do not depend on how many ranks share them.
    """

    def __init__(self, rows: list[Encoded], batch_size: int, accumulation: int, seed: int, pad_id: int,
                 token_budget: int | None = None, packed: bool = True, rank: int = 0, world: int = 1):
        self.rows, self.batch_size, self.accumulation = rows, batch_size, accumulation
        self.seed, self.pad_id = seed, pad_id
        self.rank, self.world = rank, world
        self.token_budget = token_budget or batch_size * max((r.width for r in rows), default=1)
        self.packed = packed
        self.rows_per_step = batch_size * accumulation
        self.steps_per_epoch = max(1, -(-len(rows) // self.rows_per_step))
        self._perm_epoch, self._perm = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.rows), generator=gen).tolist(), epoch
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step within the epoch) of 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def step_rows(self, step: int) -> list[Encoded]:
        epoch, index = self.position(step)
        perm = self._permutation(epoch)
        return [self.rows[j] for j in perm[index * self.rows_per_step:(index + 1) * self.rows_per_step]]

    def shard_rows(self, step: int) -> list[Encoded]:
        """This rank's rows of the step (all of them in one process)."""
        return self.step_rows(step)[self.rank::self.world]

    def step_micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of the whole step, every rank's rows (what the step's loss divisors count)."""
        return to_batches(self.step_rows(step), self.token_budget, self.packed, self.pad_id)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step."""
        return to_batches(self.shard_rows(step), self.token_budget, self.packed, self.pad_id)


def to_batches(rows: list[Encoded], budget: int, packed: bool, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate_packed(g) if packed else collate(g, pad_id) for g in group_by_tokens(rows, budget, packed)]


def eval_batches(rows: list[Encoded], like: StepBatches) -> list[dict[str, torch.Tensor]]:
    """Validation batches grouped the way ``like`` groups training rows (packing, token budget)."""
    return to_batches(rows, like.token_budget, like.packed, like.pad_id)
