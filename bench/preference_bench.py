"""Does the contrastive term earn its keep? The preference demo trained with the contrastive term off and on,
side by side in one run, scored on the same held-out pairs.

Each variant is the real train stage (in-process, builtin tiny model, the demo job's settings) on the same
split of ``configs/demo/demo_preference.jsonl``; the held-out pairs are then scored like the evaluate stage
does (mean log-likelihood per answer token, chosen vs rejected). Printed per variant: held-out preference
accuracy, mean margin (nats per token, chosen minus rejected), the eval loss of the chosen answers, and the
ratios to the baseline (generation on the chosen answers only, contrastive weight 0).

    .venv/bin/python bench/preference_bench.py [--steps 45]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

VARIANTS = {  # name -> (loss_weights, learn_chosen)
    "generation only (baseline)": ({"contrastive": 0.0}, True),
    "contrastive 0.1 (default)": ({"contrastive": 0.1}, True),
    "contrastive 0.2 (preset)": ({"contrastive": 0.2}, True),
    "contrastive 1.0": ({"contrastive": 1.0}, True),
    "contrastive only (learn_chosen off)": ({"contrastive": 1.0}, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=45, help="optimizer steps per variant (demo job: 45)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from peft import PeftModel

    from handlers import modelio
    from handlers.context import load_context
    from handlers.evaluate.preference import pair_wins
    from handlers.train import run
    from train_fixtures import make_train_stage, split_by_hash
    from trainbox.jobfile import load_job_file
    from trainbox.rows import read_examples

    job = load_job_file(REPO / "configs" / "demo" / "demo_preference.yaml")
    pairs = read_examples(REPO / "configs" / "demo" / "demo_preference.jsonl")[1]
    splits = split_by_hash(pairs, val=0.1, test=0.2)
    test = splits["test"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        for i, (name, (weights, learn_chosen)) in enumerate(VARIANTS.items()):
            train = {**job.train.model_dump(), "max_steps": args.steps,
                     "loss_weights": {**job.train.loss_weights.model_dump(), **weights},
                     "preference": {**job.train.preference.model_dump(), "learn_chosen": learn_chosen}}
            stage = make_train_stage(Path(tmp) / f"v{i}", splits, train, seed=job.seed, home=home)
            started = time.perf_counter()
            summary = run(load_context(stage)).summary
            seconds = time.perf_counter() - started
            tokenizer = modelio.load_tokenizer(stage / "tokenizer")
            base = modelio.load_causal_lm(summary["base_model_path"]).eval()
            if not rows:
                wins, margin = pair_wins(base, tokenizer, test, 128, 16, "cpu")
                rows.append(("untrained base", float(wins.mean()), float(margin.mean()), None, 0.0))
            tuned = PeftModel.from_pretrained(base, str(stage / "adapter")).eval()
            wins, margin = pair_wins(tuned, tokenizer, test, 128, 16, "cpu")
            rows.append((name, float(wins.mean()), float(margin.mean()), summary["final_eval_loss"], seconds))
    baseline = rows[1]
    print(f"preference demo, {len(test)} held-out pairs, {args.steps} steps per variant; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'variant':38} {'pref acc':>8} {'margin':>8} {'x gen':>7} {'eval loss':>9} {'train s':>8}")
    for name, acc, margin, eval_loss, seconds in rows:
        ratio = f"{margin / baseline[2]:.2f}" if baseline[2] else "-"
        eval_text = f"{eval_loss:.3f}" if eval_loss is not None else "-"
        print(f"{name:38} {acc:8.3f} {margin:8.3f} {ratio:>7} {eval_text:>9} {seconds:8.1f}")
    print(json.dumps({"margin_ratio_to_baseline": {r[0]: round(r[2] / baseline[2], 3) for r in rows[1:]}}))


if __name__ == "__main__":
    main()
