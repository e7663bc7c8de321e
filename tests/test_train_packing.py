"""Packed batches and the chunked loss give the numbers of padded batches and full float32 logits."""
from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F

from handlers import modelio
from handlers.train.data import (IGNORE, StepBatches, collate, collate_packed, encode_split, group_by_tokens,
                                 real_tokens)
from handlers.train.loop import token_loss_sum
from handlers.train.loss import head_cross_entropy
from handlers.train.model import build_model, packing_is_exact
from handlers.train.plan import TrainPlan
from trainbox.jobspec import LoraSpec
from train_fixtures import demo_examples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return modelio.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def rows(tiny):
    tokenizer = modelio.load_tokenizer(tiny)
    return encode_split(tokenizer, demo_examples()[:12], 96, "train")


@pytest.fixture
def model(tiny):
    torch.manual_seed(0)
    model = build_model(str(tiny), TrainPlan("cpu", "float32", "lora", None, False, {}), LoraSpec(r=4, alpha=8,
                                                                                                dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; move it so the adapters change the logits
            torch.nn.init.normal_(param, std=0.05)
    return model.eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE, reduction="none")


def test_each_packed_row_gets_the_loss_it_gets_alone(model, rows):
    sample = rows[:6]
    assert len({len(r.input_ids) for r in sample}) > 2, "rows of varied length"
    packed = collate_packed(sample)
    assert packed["input_ids"].shape == (1, sum(len(r.input_ids) for r in sample))
    with torch.no_grad():
        together = _token_losses(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits,
                                 packed["labels"])
        # without the position-id restarts the same tokens attend across rows: the check below can fail
        leaking = _token_losses(model(input_ids=packed["input_ids"]).logits, packed["labels"])
    start = 0
    leaked = 0.0
    for r in sample:
        n = len(r.input_ids)
        with torch.no_grad():
            alone = _token_losses(model(input_ids=torch.tensor([r.input_ids])).logits, torch.tensor([r.labels]))
        mine = together[start:start + n - 1]  # the row's own next-token predictions
        assert torch.allclose(mine, alone, atol=1e-4, rtol=1e-4), f"row of {n} tokens"
        leaked = max(leaked, float((leaking[start:start + n - 1] - alone).abs().max()))
        if start + n - 1 < len(together):
            assert together[start + n - 1] == 0  # last token of a row never predicts the next row's first
        start += n
    assert leaked > 1e-2


def test_packed_padded_and_one_by_one_loss_sums_agree(model, rows):
    sample = rows[:6]
    with torch.no_grad():
        packed, n_packed = token_loss_sum(model, collate_packed(sample))
        padded, n_padded = token_loss_sum(model, collate(sample, pad_id=0))
        singles = [token_loss_sum(model, collate_packed([r])) for r in sample]
    assert n_packed == n_padded == sum(n for _, n in singles) == sum(r.loss_tokens for r in sample)
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)
    assert float(packed) == pytest.approx(sum(float(s) for s, _ in singles), rel=1e-5)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _full_logits_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), _lora_grads(model)


def test_chunked_loss_equals_the_full_float32_logits_loss_in_value_and_gradient(model, rows):
    batch = collate(rows[:5], pad_id=0)
    want, want_grads = _full_logits_loss(model, batch)

    model.zero_grad()
    got, n = token_loss_sum(model, batch)
    got.backward()
    got_grads = _lora_grads(model)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)

    # Both float32 paths sum in a different order, so neither is "the" answer: each is compared with a float64
    # run of the same model, and the chunked path must be as close to it as the full-logits path is.
    exact, exact_grads = _full_logits_loss(copy.deepcopy(model).double(), batch)
    assert float(got.detach()) == pytest.approx(float(exact), rel=1e-6)
    for name, exact_grad in exact_grads.items():
        full_err = float((want_grads[name].double() - exact_grad).abs().max())
        chunk_err = float((got_grads[name].double() - exact_grad).abs().max())
        assert chunk_err <= 2 * full_err + 1e-7, (name, chunk_err, full_err)
        assert chunk_err <= 1e-5 * float(exact_grad.abs().max()) + 1e-7, (name, chunk_err)


@pytest.mark.parametrize("trained_head", [False, True])
def test_every_chunk_size_gives_the_same_loss_and_hidden_gradient(model, trained_head):
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(trained_head)  # a trained head takes the checkpointed path
    torch.manual_seed(1)
    hidden = torch.randn(37, head.weight.shape[1], requires_grad=True)
    targets = torch.randint(0, head.weight.shape[0], (37,))
    want = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    for chunk in (1, 5, 37, 64):
        got = head_cross_entropy(model, hidden, targets, chunk=chunk)
        (grad,) = torch.autograd.grad(got, hidden)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5), chunk
        assert torch.allclose(grad, want_grad, atol=1e-6, rtol=1e-4), chunk
    head.weight.requires_grad_(False)


def test_the_tiny_llama_packs_exactly(model, rows):
    assert packing_is_exact(model, rows, "cpu")


def test_micro_batches_fit_the_token_budget_and_a_step_sees_the_same_rows_either_way(rows):
    for packed in (True, False):
        groups = group_by_tokens(rows, 200, packed)
        assert sorted(map(id, (r for g in groups for r in g))) == sorted(map(id, rows))
        for g in groups:
            cost = sum(len(r.input_ids) for r in g) if packed else len(g) * max(len(r.input_ids) for r in g)
            assert cost <= 200 or len(g) == 1
    packed = StepBatches(rows, 2, 3, seed=7, pad_id=0, token_budget=150)
    padded = StepBatches(rows, 2, 3, seed=7, pad_id=0, token_budget=150, packed=False)
    assert packed.steps_per_epoch == padded.steps_per_epoch == 2
    for step in range(4):
        mbs_packed, mbs_padded = packed.micro_batches(step), padded.micro_batches(step)
        assert all("attention_mask" not in mb and mb["input_ids"].numel() <= 150 for mb in mbs_packed)
        tokens = sum(len(r.input_ids) for r in packed.step_rows(step))
        assert sum(real_tokens(mb) for mb in mbs_packed) == sum(real_tokens(mb) for mb in mbs_padded) == tokens
        labels = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in mbs_packed)
        assert labels == sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in mbs_padded)
    fresh = StepBatches(rows, 2, 3, seed=7, pad_id=0, token_budget=150)
    assert [mb["input_ids"].tolist() for mb in fresh.micro_batches(3)] == \
        [mb["input_ids"].tolist() for mb in packed.micro_batches(3)]
