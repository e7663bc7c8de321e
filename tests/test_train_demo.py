"""The shipped demo job teaches the builtin tiny model the four-class safety policy."""
from __future__ import annotations

import json

import pytest
import torch

from handlers import modelio
from handlers.context import load_context
from handlers.train import run
from trainbox.jobfile import load_job_file
from train_fixtures import REPO, demo_examples, make_train_stage, split_by_hash

LABELS = ("ALLOW", "ESCALATION", "DENY", "REFUSE")


def label_accuracy(model, tokenizer, examples) -> float:
    """Pick the label whose answer tokens are most likely after the prompt (what likelihood evaluation does)."""
    correct = 0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            prompt = modelio.prompt_text(tokenizer, modelio.example_messages(ex))
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            scores = []
            for label in LABELS:
                t_ids = tokenizer(label + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                logp = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0, :-1].log_softmax(-1)
                scores.append(sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(t_ids)))
            correct += LABELS[max(range(len(LABELS)), key=scores.__getitem__)] == ex.label
    return correct / len(examples)


@pytest.mark.slow
def test_demo_job_learns_the_safety_labels(tmp_path):
    job = load_job_file(REPO / "configs" / "demo" / "demo_job.yaml")
    assert job.base_model == "builtin:tiny" and job.stages == ["prepare", "train", "evaluate", "export"]
    splits = split_by_hash(demo_examples(), val=0.1, test=0.1)
    stage = make_train_stage(tmp_path, splits, job.train.model_dump(), seed=job.seed)
    result = run(load_context(stage))
    first_loss = json.loads((stage / "metrics" / "training_metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert result.summary["final_loss"] < 0.25 * first_loss  # measured: 7.08 -> 0.68
    assert result.summary["final_eval_loss"] < 1.5

    from peft import PeftModel

    base = modelio.load_causal_lm(result.summary["base_model_path"])
    tokenizer = modelio.load_tokenizer(stage / "tokenizer")
    before = label_accuracy(base, tokenizer, splits["test"])
    tuned = PeftModel.from_pretrained(base, str(stage / "adapter"))
    after = label_accuracy(tuned, tokenizer, splits["test"])
    assert after >= 0.6, f"held-out accuracy {after:.2f} (chance 0.25, before training {before:.2f})"
    assert after > before + 0.25
