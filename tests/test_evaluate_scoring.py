"""Label log-likelihood scoring on the real tiny model: batched equals one at a time and equals a hand sum."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers import modelio
from handlers.evaluate import scoring
from trainbox.rows import Example

LABELS = ["ALLOW", "DENY", "ESCALATION", "REFUSE"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = modelio.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    model = modelio.load_causal_lm(folder)
    model.eval()
    return modelio.load_tokenizer(folder), model


def _examples(n: int) -> list[Example]:
    rows = []
    for i in range(n):
        think = {"task": "t", "safety": "s", "policy": "p"} if i % 3 == 0 else None
        rows.append(Example(id=str(i), format="classification", text="help me please " * (1 + i % 7),
                            label=LABELS[i % 4], think=think))
    return rows


def test_continuations_are_the_label_and_its_end_of_turn(tiny):
    tokenizer, _ = tiny
    cands = scoring.encode_candidates(tokenizer, _examples(2), LABELS, 1024)
    assert cands.n_examples == 2 and cands.n_labels == 4
    assert tokenizer.decode(cands.conts[1][1]) == "DENY<|end|>"  # example 1 (no think), label DENY
    assert tokenizer.decode(cands.conts[0][3]) == "REFUSE</final><|end|>"  # a think row
    assert tokenizer.decode(cands.prefixes[0]).endswith("<|assistant|>\n<final>")
    assert tokenizer.decode(cands.prefixes[1]).endswith("<|assistant|>\n")


def test_labels_are_scored_after_the_models_own_reasoning(tiny):
    tokenizer, _ = tiny
    output = "<think-task>asks for a password</think-task><think-policy>deny</think-policy><final>DENY</final>"
    reasoning = scoring.reasoning_before_final(output)
    assert reasoning == "<think-task>asks for a password</think-task><think-policy>deny</think-policy>"
    assert scoring.reasoning_before_final("DENY") is None
    assert scoring.reasoning_before_final("<think-task>cut off before the answer") is None
    cands = scoring.encode_candidates(tokenizer, _examples(2), LABELS, 1024, reasoning=[reasoning, None])
    assert tokenizer.decode(cands.prefixes[0]).endswith(f"<|assistant|>\n{reasoning}<final>")
    assert tokenizer.decode(cands.conts[0][2]) == "ESCALATION</final><|end|>"
    assert tokenizer.decode(cands.conts[1][0]) == "ALLOW<|end|>"


def test_shared_prompt_scores_equal_plain_full_sequence_scores_and_a_hand_sum(tiny):
    tokenizer, model = tiny
    cands = scoring.encode_candidates(tokenizer, _examples(12), LABELS, 1024)
    batched = scoring.label_logits(model, cands, batch_size=5, pad_id=tokenizer.pad_token_id, device="cpu")
    rows, conts = cands.sequences()
    plain = np.array([scoring.sequence_logprob(model, [ids], [c], tokenizer.pad_token_id, "cpu")[0]
                      for ids, c in zip(rows, conts)]).reshape(12, 4)
    np.testing.assert_allclose(batched, plain, atol=1e-4)
    one_at_a_time = scoring.label_logits(model, cands, batch_size=1, pad_id=tokenizer.pad_token_id, device="cpu")
    np.testing.assert_allclose(batched, one_at_a_time, atol=1e-4)
    ids, n = rows[7], conts[7]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    by_hand = sum(logp[len(ids) - n - 1 + i, ids[len(ids) - n + i]].item() for i in range(n))
    assert batched[1, 3] == pytest.approx(by_hand, abs=1e-4)


def test_long_prompts_keep_their_continuation(tiny):
    tokenizer, model = tiny
    long = [Example(id="x", format="classification", text="word " * 400, label="ALLOW")]
    cands = scoring.encode_candidates(tokenizer, long, LABELS, 64)
    assert cands.truncated == 1
    assert max(len(cands.prefixes[0]) + len(c) for c in cands.conts[0]) == 64
    assert tokenizer.decode(cands.conts[0][2]) == "ESCALATION<|end|>"
    assert np.isfinite(scoring.label_logits(model, cands, 4, tokenizer.pad_token_id, "cpu")).all()


def test_batched_generation_equals_one_at_a_time(tiny):
    tokenizer, model = tiny
    prompts = [modelio.prompt_text(tokenizer, [{"role": "user", "content": "hi " * k},
                                               {"role": "assistant", "content": ""}]) for k in (1, 5, 9)]
    batched = scoring.generate(model, tokenizer, prompts, 8, 3, "cpu")
    single = [scoring.generate(model, tokenizer, [p], 8, 1, "cpu")[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)
