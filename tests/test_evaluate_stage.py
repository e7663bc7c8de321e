"""The evaluate stage end to end on adapters trained for real by the train stage (child processes)."""
from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from trainbox.rows import Example
from evaluate_fixtures import (REPO_ROOT, demo_splits, make_eval_stage, run_evaluate, train_demo)

pytestmark = pytest.mark.slow


class Page(HTMLParser):
    """Collects what a self-contained page must not have (external refs) and its images."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag in ("link", "script", "iframe"):
            self.external.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_report(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    splits = demo_splits()
    train_dir = train_demo(root, splits)
    return root, splits, train_dir


def test_tuned_demo_model_beats_its_random_base_and_the_report_says_so(demo):
    _root, splits, train_dir = demo
    stage = make_eval_stage(train_dir, {"mode": "likelihood", "latency_examples": 10})
    result = run_evaluate(stage)
    s = result.summary
    assert s["winner"] is True and s["reference"] == "base"
    assert s["p_value"] < 0.01
    assert s["accuracy"] > s["base_accuracy"] + 0.2
    assert 0 <= s["ece"] <= 1 and 0 <= s["ece_after"] <= 1
    assert s["latency_p50_ms"] > 0 and s["latency_p95_ms"] >= s["latency_p50_ms"] and s["examples_per_s"] > 0
    assert result.model["winner"] is True and result.model["temperature"] == s["temperature"]
    assert result.model["metrics"]["accuracy"] == s["accuracy"]
    assert result.model_artifacts == {"eval_report": "report"} and (stage / result.artifacts["report"]).is_file()

    for name, rel in result.artifacts.items():
        assert (stage / rel).is_file(), name
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert doc["schema_version"] == 1 and doc["n_test"] == len(splits["test"])
    assert doc["comparisons"]["base"]["mcnemar"]["p_value"] == pytest.approx(s["p_value"])
    table = doc["comparisons"]["base"]["mcnemar"]["table"]
    assert sum(map(sum, table)) == len(splits["test"])
    ci = doc["comparisons"]["base"]["bootstrap"]["accuracy_diff"]
    assert 0 < ci["ci_low"] <= ci["estimate"] <= ci["ci_high"]
    cal = doc["calibration"]
    assert cal["val_rows"] == len(splits["val"]) < cal["min_val_rows"] == 100
    assert s["temperature"] == cal["temperature"] == 1.0 and s["temperature_fitted"] is False
    assert cal["ece_after"] == cal["ece"] and cal["candidate_temperature"] > 0
    predictions = [json.loads(line) for line in (stage / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(splits["test"])
    assert sum(p["tuned"] == p["label"] for p in predictions) / len(predictions) == pytest.approx(s["accuracy"])
    assert sum(predictions[0]["tuned_probs"].values()) == pytest.approx(1.0, abs=1e-4)
    rows = list(csv.DictReader((stage / "summary.csv").open()))
    assert [r["model"] for r in rows] == ["tuned", "base"]
    assert float(rows[0]["accuracy"]) == pytest.approx(s["accuracy"], abs=1e-5) and rows[0]["winner"] == "True"

    page = parse_report(stage / "report.html")
    text = " ".join(" ".join(page.text).split())
    assert "Winner: the fine-tuned model is better than the base model." in text
    assert "How latency was measured" in text and "No temperature fitted: the validation split has" in text
    assert "McNemar exact test p " in text
    assert f"{s['accuracy']:.3f}" in text and f"{s['base_accuracy']:.3f}" in text
    assert page.external == []
    assert len(page.images) == 4  # per-class bars, two confusion matrices, reliability diagram
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_and_base_latency_agree_as_the_same_architecture_should(demo):
    """Same weights shape, deployed forms (merged adapter vs none), alternating rounds: p50 and examples/s of the
    tuned and the base model agree within a sane factor, and latency and throughput do not contradict."""
    _root, _splits, train_dir = demo
    stage = make_eval_stage(train_dir, {"mode": "likelihood", "latency_examples": 24, "latency_rounds": 4,
                                        "bootstrap_samples": 200, "calibration_min_val_rows": 20},
                            name="evaluate-latency")
    run_evaluate(stage)
    doc = json.loads((stage / "evaluation_results.json").read_text())
    tuned, base = doc["models"]["tuned"]["metrics"], doc["models"]["base"]["metrics"]
    assert 1 / 2 < tuned["latency_p50_ms"] / base["latency_p50_ms"] < 2
    assert 1 / 2 < tuned["examples_per_s"] / base["examples_per_s"] < 2
    change = doc["comparisons"]["base"]
    assert change["directions_agree"] is True
    ci = change["latency_p50_change"]
    assert ci["ci_low"] <= change["latency_p50_change_pct"] <= ci["ci_high"]
    assert tuned["latency_samples"] == base["latency_samples"] == 96
    assert doc["timing"]["rounds"] == 4 and doc["timing"]["threads"] >= 1
    cal = doc["calibration"]  # 48 validation rows >= 20: the cross-validated rule decides
    assert cal["cv_nll"] is not None and cal["val_nll_after"] <= cal["val_nll"]
    assert cal["fitted"] == (cal["temperature"] != 1.0)


def test_previous_version_is_compared_and_can_be_the_reference(demo):
    root, splits, train_dir = demo
    weaker = train_demo(root / "v1", splits, train={"max_steps": 8, "batch_size": 8, "learning_rate": 1e-3},
                        home=root / "home")
    previous = {"name": "t", "version": 1, "base_model": "builtin:tiny", "metrics": {},
                "artifacts": {"adapter": str(weaker / "adapter")}}
    stage = make_eval_stage(train_dir, {"winner_rule": {"against": "previous"}, "bootstrap_samples": 200,
                                        "max_examples": 40, "latency_examples": 5},
                            previous_model=previous, model={"name": "t", "version": 2}, name="evaluate-v2")
    result = run_evaluate(stage)
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert set(doc["models"]) == {"tuned", "base", "previous"}
    assert doc["reference"] == "previous" and result.summary["reference"] == "previous"
    assert set(doc["comparisons"]) == {"base", "previous"}
    assert result.summary["previous_accuracy"] == doc["models"]["previous"]["metrics"]["accuracy"]
    assert result.summary["p_value"] == doc["comparisons"]["previous"]["mcnemar"]["p_value"]
    page = parse_report(stage / "report.html")
    assert len(page.images) == 5 and "previous" in " ".join(page.text)

    missing = {**previous, "artifacts": {"adapter": str(root / "gone")}}
    stage = make_eval_stage(train_dir, {"compare_base": False, "max_examples": 10, "latency_examples": 2},
                            previous_model=missing, name="evaluate-none")
    result = run_evaluate(stage)
    assert result.summary["winner"] is None and "no reference model" in result.summary["winner_reason"]
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert set(doc["models"]) == {"tuned"} and "no adapter on disk" in doc["skipped"]["previous"]


def test_generate_mode_parses_final_and_lists_unparseable_answers(demo):
    _root, _splits, train_dir = demo
    stage = make_eval_stage(train_dir, {"mode": "both", "max_examples": 16, "max_new_tokens": 40,
                                        "bootstrap_samples": 100, "latency_examples": 3}, name="evaluate-both")
    run_evaluate(stage)
    doc = json.loads((stage / "evaluation_results.json").read_text())
    for name in ("tuned", "base"):
        gen = doc["models"][name]["generation"]
        assert gen["metrics"]["n"] == 16
        assert gen["unparseable_count"] == gen["metrics"]["unparseable"] == len(gen["unparseable"])
    assert doc["models"]["base"]["generation"]["unparseable_count"] == 16  # a random model answers gibberish
    tuned = doc["models"]["tuned"]
    assert tuned["metrics"]["latency_p50_ms"] > 0 and doc["timing"]["what"].startswith("generating one answer")
    assert doc["calibration"]["val_rows"] > 0 and doc["calibration"]["candidate_temperature"] > 0
    predictions = [json.loads(line) for line in (stage / "predictions.jsonl").read_text().splitlines()]
    assert all("tuned_generated" in p for p in predictions)
    text = " ".join(parse_report(stage / "report.html").text)
    assert "Unparseable answers of the base model (16)" in text

    stage = make_eval_stage(train_dir, {"mode": "generate", "max_examples": 8, "max_new_tokens": 20,
                                        "bootstrap_samples": 100, "latency_examples": 2}, name="evaluate-gen")
    result = run_evaluate(stage)
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert doc["calibration"] is None and "temperature" not in result.model
    tuned = doc["models"]["tuned"]
    assert tuned["metrics"]["accuracy"] == tuned["generation"]["metrics"]["accuracy"] == result.summary["accuracy"]
    assert len(parse_report(stage / "report.html").images) == 3  # no reliability diagram without likelihoods


GREETINGS = {"en": ("Say hello.", "Hello, nice to meet you."), "ja": ("挨拶してください。", "こんにちは、よろしくお願いします。")}


def _generation_rows(n: int) -> list[Example]:
    """English and Japanese instructions: notes on numbered topics (learnable in shape, not in every word) and
    fixed greetings (learnable word for word), by ``i % 4``: en note, ja note, en greeting, ja greeting."""
    topics = ["the weather", "soup", "trains", "gardens", "music", "rivers", "bread", "cats", "stars", "tea"]
    japanese = ["天気", "料理", "電車", "音楽", "川", "猫", "星", "お茶"]
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            topic = f"{topics[i % len(topics)]} {i}"
            turns = (f"Tell me about {topic}.", f"Here is a short note on {topic}.")
        elif kind == 1:
            topic = f"{japanese[i % len(japanese)]}{i}"
            turns = (f"{topic}について教えてください。", f"{topic}についての短いメモです。")
        else:
            turns = GREETINGS["en" if kind == 2 else "ja"]
        rows.append(Example(id=f"g{i}", format="messages", messages=[
            {"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]}]))
    return rows


def test_generation_dataset_in_a_child_process(tmp_path):
    rows = _generation_rows(90)
    splits = {"train": rows[:60], "val": rows[60:70], "test": rows[70:]}
    train_dir = train_demo(tmp_path, splits, train={"max_steps": 60, "batch_size": 8, "learning_rate": 3e-3,
                                                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    stage = make_eval_stage(train_dir, {"samples": 3, "max_new_tokens": 24, "generate_examples": 16,
                                        "bootstrap_samples": 300}, labels=[])
    code = subprocess.run([sys.executable, "-m", "handlers", "evaluate", str(stage)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-3000:]
    result = json.loads((stage / "result.json").read_text())
    s = result["summary"]
    assert s["task"] == "generation" and s["eval_loss"] < s["base_eval_loss"]
    assert s["perplexity"] == pytest.approx(2.718281828 ** s["eval_loss"], rel=1e-6)
    assert s["winner"] is True and s["p_value"] < 0.01
    assert result["message"].startswith(f"token-weighted eval loss {s['eval_loss']:.4f}; winner: ")
    assert f"token-weighted eval loss {s['base_eval_loss']:.4f} -> {s['eval_loss']:.4f}" in s["winner_reason"]
    doc = json.loads((stage / "evaluation_results.json").read_text())
    tuned, base = doc["models"]["tuned"]["metrics"], doc["models"]["base"]["metrics"]
    assert tuned["example_mean_loss"] == pytest.approx(sum(tuned["per_example"]) / 20)
    assert tuned["answered"] == base["answered"] == doc["answered"] == 16
    answers = doc["comparisons"]["base"]["answers"]
    for key in ("exact_match", "token_f1", "rouge_l", "chrf"):
        assert 0 <= base[key] < tuned[key] <= 1 and s[key] == tuned[key] and s[f"base_{key}"] == base[key], key
        assert answers[key]["new"] == tuned[key] and answers[key]["diff"] > 0, key
    for key in ("token_f1", "rouge_l", "chrf"):
        assert answers[key]["test"] == "Wilcoxon" and answers[key]["ci_low"] > 0 and answers[key]["p_value"] < 0.01
    assert answers["exact_match"]["test"] == "McNemar"
    lines = [json.loads(line) for line in (stage / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 16 and lines[1]["reference"] == GREETINGS["ja"][1]
    assert sum(line["tuned_scores"]["exact_match"] for line in lines) / 16 == pytest.approx(tuned["exact_match"])
    assert len(doc["samples"]) == 3 and doc["samples"][0]["reference"] == GREETINGS["en"][1]
    assert {"tuned", "base", "prompt", "chrf"} <= set(doc["samples"][0])
    rows = list(csv.DictReader((stage / "summary.csv").open()))
    assert float(rows[0]["chrf"]) == pytest.approx(tuned["chrf"], abs=1e-5)
    page = parse_report(stage / "report.html")
    assert len(page.images) == 1 and page.external == []
    text = " ".join(" ".join(page.text).split())
    assert "Sample generations" in text and "Generated answers against the references" in text
    assert "eval loss (token-weighted)" in text and "mean per-example loss" in text
