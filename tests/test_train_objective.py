"""The multi-task objective on the tiny model: terms by row kind, pairs kept together, packing still exact,
the rejected answer never a target, and one SimPO step widens the chosen-over-rejected margin."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from handlers import modelio
from handlers.train.data import NOT_A_TARGET, TERMS, collate, collate_packed, encode_split, group_by_tokens
from handlers.train.model import build_model
from handlers.train.objective import Objective, StepCounts, micro_loss, micro_terms, step_record, step_sums
from handlers.train.plan import TrainPlan
from trainbox.jobspec import LoraSpec
from train_fixtures import all_kinds_examples

OBJECTIVE = Objective((1.0, 0.3, 0.2), 0.1, beta=2.0, margin=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return modelio.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def examples():
    return all_kinds_examples(24)


@pytest.fixture(scope="module")
def units(tiny, examples):
    return encode_split(modelio.load_tokenizer(tiny), examples, 96, "train")


@pytest.fixture
def model(tiny):
    torch.manual_seed(0)
    return build_model(str(tiny), TrainPlan("cpu", "float32", "lora", None, False, {}),
                       LoraSpec(r=4, alpha=8, dropout=0.0)).eval()


def test_each_kind_feeds_its_term_and_a_pair_is_one_unit(units, examples):
    pairs = [u for u in units if u.rejected is not None]
    assert len(pairs) == sum(ex.kind == "hard_negative" for ex in examples) == 12
    assert all(u.rejected.term == NOT_A_TARGET for u in pairs)
    # a hard negative's chosen answer is its source row, already a generation target: not learned twice
    assert all(u.term == NOT_A_TARGET for u in pairs)
    by_term = {name: sum(u.rejected is None and u.term == k for u in units) for k, name in enumerate(TERMS)}
    assert by_term == {"generation": 24, "style": 16, "relationship": 8}  # scenario rows count as style


def test_a_preference_pairs_chosen_answer_is_learned_unless_already_a_row(tiny, examples):
    tokenizer = modelio.load_tokenizer(tiny)
    only_pairs = [dataclasses.replace(ex, kind="preference") for ex in examples if ex.kind == "hard_negative"]
    learned = encode_split(tokenizer, only_pairs, 96, "train")
    assert all(u.term == TERMS.index("generation") for u in learned)
    assert all(u.term == NOT_A_TARGET for u in encode_split(tokenizer, only_pairs, 96, "train", learn_chosen=False))


def test_pairs_stay_together_and_packed_terms_equal_padded_terms(model, units):
    for packed in (True, False):
        for group in group_by_tokens(units, 300, packed):
            batch = collate_packed(group) if packed else collate(group, pad_id=0)
            assert len(batch["pairs"]) == sum(u.rejected is not None for u in group)
    sample = units[20:34]
    assert any(u.rejected is not None for u in sample) and any(u.rejected is None for u in sample)
    with torch.no_grad():
        packed = micro_terms(model, collate_packed(sample), OBJECTIVE)
        padded = micro_terms(model, collate(sample, pad_id=0), OBJECTIVE)
    for a, b in zip(packed.token_sums, padded.token_sums):
        assert float(a) == pytest.approx(float(b), rel=1e-5)
    assert torch.allclose(packed.chosen_mean_logp, padded.chosen_mean_logp, atol=1e-5)
    assert torch.allclose(packed.pair_losses, padded.pair_losses, atol=1e-5)


def test_step_record_weights_the_terms_and_the_contrastive_gradient_widens_the_margin(model, units):
    pairs = [u for u in units if u.rejected is not None][:6]
    batch = collate_packed(pairs)
    counts = StepCounts.of([batch])
    assert counts.tokens == [0, 0, 0] and counts.pairs == 6  # hard negatives: only the contrastive term
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    margins = []
    for _ in range(3):
        part = micro_terms(model, batch, OBJECTIVE)
        record = step_record(step_sums([part]), counts, OBJECTIVE)
        assert record["loss"] == pytest.approx(0.1 * record["loss_contrastive"])
        assert record["loss_generation"] is None and record["loss_style"] is None
        margins.append(float((part.chosen_mean_logp - part.rejected_mean_logp).detach().mean()))
        optimizer.zero_grad()
        micro_loss(part, counts, OBJECTIVE).backward()
        optimizer.step()
    assert margins[2] > margins[1] > margins[0]
