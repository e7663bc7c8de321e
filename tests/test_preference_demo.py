"""The shipped preference demo: pairs in dpo_en_demo format train the tiny model (preference loss plus the
generation term on the chosen answers), and on held-out pairs the tuned model prefers the chosen answer more
often than the base model, significantly (McNemar), as the evaluate report says."""
from __future__ import annotations

import json

import pytest

from evaluate_fixtures import make_eval_stage, run_evaluate
from train_fixtures import REPO, make_train_stage, metric_rows, run_stage, split_by_hash
from trainbox.jobfile import load_job_file
from trainbox.rows import read_examples

pytestmark = pytest.mark.slow
DEMO = REPO / "configs" / "demo"


def test_preference_demo_beats_the_base_model_on_held_out_pairs(tmp_path):
    job = load_job_file(DEMO / "demo_preference.yaml")
    info, pairs = read_examples(DEMO / "demo_preference.jsonl")
    assert job.datasets == ["demo_preference.jsonl"] and info.format == "preference" and info.rows == 150
    assert all(ex.kind == "preference" for ex in pairs)
    splits = split_by_hash(pairs, val=0.1, test=0.2)
    stage = make_train_stage(tmp_path, splits, {**job.train.model_dump(), "max_steps": 20}, seed=job.seed)
    assert run_stage(stage, timeout=600) == 0, (tmp_path / "job" / "child.log").read_text()[-3000:]
    rows = metric_rows(stage)
    assert all(r["loss_contrastive"] is not None and r["loss_generation"] is not None for r in rows)
    assert all(r["loss_style"] is None and r["loss_relationship"] is None for r in rows)
    assert rows[-1]["loss_contrastive"] < rows[0]["loss_contrastive"]

    evaluate = make_eval_stage(stage, {"generate_examples": 0, "samples": 0})
    summary = run_evaluate(evaluate).summary
    assert summary["preference_pairs"] == len(splits["test"]) >= 20
    tuned, base = summary["preference_accuracy"], summary["base_preference_accuracy"]
    assert tuned >= 0.8 and tuned > base + 0.3, (tuned, base)  # measured: 1.0 vs 0.2 (docs/training.md)
    assert summary["preference_p_value"] < 0.05
    results = json.loads((evaluate / "evaluation_results.json").read_text())
    assert results["preference"]["comparisons"]["base"]["accuracy_diff"]["ci_low"] > 0
    outcomes = (evaluate / "preference_pairs.jsonl").read_text().splitlines()
    assert len(outcomes) == len(splits["test"]) and "tuned_chosen_higher" in outcomes[0]
    assert "Preference accuracy" in (evaluate / "report.html").read_text()
