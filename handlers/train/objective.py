"""The multi-task objective: weighted token losses per row kind plus a reference-free preference loss.

``loss = w_gen * L_generation + w_style * L_style + w_rel * L_relationship + w_con * L_contrastive``, each term
over the rows of the optimizer step that belong to it (a term without rows in the step is left out and logged
as null). The token terms are next-token cross-entropy means over their label tokens, through the chunked head
loss (``loss.head_cross_entropy``). The contrastive term is SimPO's: ``-log sigmoid(beta * (m_chosen -
m_rejected) - margin)`` where ``m`` is an answer's mean log-likelihood per token, averaged over the step's pairs.
It needs no reference model: one forward pass over both answers, which share a micro-batch, packed or padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from handlers.train.data import IGNORE, NOT_A_TARGET, TERMS
from handlers.train.loss import decoder_of, head_cross_entropy
from handlers.train.metrics import LOSS_TERMS
from trainbox.jobspec import TrainSpec

assert LOSS_TERMS == tuple(f"loss_{t}" for t in (*TERMS, "contrastive")), "one metrics column per term"


@dataclass(frozen=True)
class Objective:
    weights: tuple[float, ...]  # one per TERMS entry
    contrastive: float
    beta: float
    margin: float

    @classmethod
    def of(cls, spec: TrainSpec) -> "Objective":
        w = spec.loss_weights
        return cls((w.generation, w.style, w.relationship), w.contrastive, spec.preference.beta,
                   spec.preference.margin)


@dataclass
class StepCounts:
    """How many label tokens each token term has in a step, and how many pairs: the divisors of the means."""

    tokens: list[int]
    pairs: int

    @classmethod
    def of(cls, micro: list[dict[str, torch.Tensor]]) -> "StepCounts":
        tokens = [0] * len(TERMS)
        for mb in micro:
            keep = mb["labels"][:, 1:] != IGNORE
            terms = mb["terms"][:, 1:]
            for k in range(len(TERMS)):
                tokens[k] += int((keep & (terms == k)).sum())
        return cls(tokens, sum(len(mb["pairs"]) for mb in micro))


@dataclass
class MicroTerms:
    """One micro-batch's contribution: summed token loss per term, SimPO loss per pair, answers' mean log-lik."""

    token_sums: list[torch.Tensor]
    pair_losses: torch.Tensor
    chosen_mean_logp: torch.Tensor
    rejected_mean_logp: torch.Tensor


def _target_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE


def hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states of every position that predicts a next token."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return decoder_of(model)(**inputs).last_hidden_state[:, :-1]


def micro_terms(model: Any, batch: dict[str, torch.Tensor], objective: Objective) -> MicroTerms:
    """Run the decoder once over ``batch`` and compute every term's share from the same hidden states."""
    hidden = hidden_states(model, batch)
    targets, keep = _target_positions(batch)
    terms = batch["terms"][:, 1:]
    sums = []
    for k in range(len(TERMS)):
        where = keep & (terms == k)
        sums.append(head_cross_entropy(model, hidden[where], targets[where]) if bool(where.any())
                    else hidden.new_zeros((), dtype=torch.float32))
    seq = batch["seq"][:, 1:]
    means = []
    for chosen, rejected in batch["pairs"].tolist():
        for s in (chosen, rejected):
            where = keep & (seq == s)
            means.append(-head_cross_entropy(model, hidden[where], targets[where]) / int(where.sum()))
    if means:
        pair_means = torch.stack(means).view(-1, 2)
        chosen_m, rejected_m = pair_means[:, 0], pair_means[:, 1]
        pair_losses = -F.logsigmoid(objective.beta * (chosen_m - rejected_m) - objective.margin)
    else:
        chosen_m = rejected_m = pair_losses = hidden.new_zeros((0,), dtype=torch.float32)
    return MicroTerms(sums, pair_losses, chosen_m, rejected_m)


def micro_loss(part: MicroTerms, counts: StepCounts, objective: Objective) -> torch.Tensor:
    """This micro-batch's share of the step loss, so that backward per micro-batch sums to the step's gradient."""
    loss = part.pair_losses.sum() * (objective.contrastive / counts.pairs) if counts.pairs else None
    for k, total in enumerate(part.token_sums):
        if counts.tokens[k]:
            term = total * (objective.weights[k] / counts.tokens[k])
            loss = term if loss is None else loss + term
    assert loss is not None, "a step always has label tokens or pairs"
    return loss


def step_sums(parts: list[MicroTerms]) -> list[float]:
    """The numerators of the step record: summed token loss per term, summed pair loss, pairs won (these add
    up over micro-batches and over ranks)."""
    sums = [sum(float(p.token_sums[k].detach()) for p in parts) for k in range(len(TERMS))]
    return [*sums, sum(float(p.pair_losses.detach().sum()) for p in parts),
            sum(int((p.chosen_mean_logp > p.rejected_mean_logp).sum()) for p in parts)]


def step_record(sums: list[float], counts: StepCounts, objective: Objective) -> dict[str, Any]:
    """The step's loss and each term's unweighted value (None where the step has no rows of that term)."""
    record: dict[str, Any] = {}
    total = 0.0
    for k in range(len(TERMS)):
        value = sums[k] / counts.tokens[k] if counts.tokens[k] else None
        record[LOSS_TERMS[k]] = value
        total += objective.weights[k] * value if value is not None else 0.0
    if counts.pairs:
        value = sums[len(TERMS)] / counts.pairs
        record[LOSS_TERMS[-1]] = value
        total += objective.contrastive * value
        record["preference_accuracy"] = sums[len(TERMS) + 1] / counts.pairs
    else:
        record[LOSS_TERMS[-1]] = record["preference_accuracy"] = None
    record["loss"] = total
    return record


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens of a batch (never a rejected answer), and their
    count; what the validation loss averages."""
    hidden = hidden_states(model, batch)
    targets, keep = _target_positions(batch)
    if "terms" in batch:
        keep = keep & (batch["terms"][:, 1:] != NOT_A_TARGET)
    return head_cross_entropy(model, hidden[keep], targets[keep]), int(keep.sum())
