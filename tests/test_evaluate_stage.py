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

from daemon.formats import Example
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
    assert s["temperature"] > 0 and 0 <= s["ece"] <= 1 and 0 <= s["ece_after"] <= 1
    assert s["latency_p50_ms"] > 0 and s["latency_p95_ms"] >= s["latency_p50_ms"] and s["examples_per_s"] > 0
    assert result.model["winner"] is True and result.model["temperature"] == s["temperature"]
    assert result.model["metrics"]["accuracy"] == s["accuracy"]
    assert Path(result.model["eval_report"]).is_absolute() and Path(result.model["eval_report"]).exists()

    for name, rel in result.artifacts.items():
        assert (stage / rel).is_file(), name
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert doc["schema_version"] == 1 and doc["n_test"] == len(splits["test"])
    assert doc["comparisons"]["base"]["mcnemar"]["p_value"] == pytest.approx(s["p_value"])
    table = doc["comparisons"]["base"]["mcnemar"]["table"]
    assert sum(map(sum, table)) == len(splits["test"])
    ci = doc["comparisons"]["base"]["bootstrap"]["accuracy_diff"]
    assert 0 < ci["ci_low"] <= ci["estimate"] <= ci["ci_high"]
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
    assert "McNemar exact test p " in text
    assert f"{s['accuracy']:.3f}" in text and f"{s['base_accuracy']:.3f}" in text
    assert page.external == []
    assert len(page.images) == 4  # per-class bars, two confusion matrices, reliability diagram
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert tuned["metrics"]["latency_p50_ms"] == tuned["generation"]["latency"]["latency_p50_ms"]
    assert doc["calibration"]["fitted_on"] == "val"
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


def _generation_rows(n: int) -> list[Example]:
    topics = ["the weather", "soup", "trains", "gardens", "music", "rivers", "bread", "cats", "stars", "tea"]
    rows = []
    for i in range(n):
        topic = f"{topics[i % len(topics)]} {i}"
        rows.append(Example(id=f"g{i}", format="messages", messages=[
            {"role": "user", "content": f"Tell me about {topic}."},
            {"role": "assistant", "content": f"Here is a short note on {topic}."}]))
    return rows


def test_generation_dataset_in_a_child_process(tmp_path):
    rows = _generation_rows(90)
    splits = {"train": rows[:60], "val": rows[60:70], "test": rows[70:]}
    train_dir = train_demo(tmp_path, splits, train={"max_steps": 40, "batch_size": 8, "learning_rate": 3e-3,
                                                     "lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    stage = make_eval_stage(train_dir, {"samples": 3, "max_new_tokens": 16}, labels=[])
    code = subprocess.run([sys.executable, "-m", "handlers", "evaluate", str(stage)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-3000:]
    result = json.loads((stage / "result.json").read_text())
    s = result["summary"]
    assert s["task"] == "generation" and s["eval_loss"] < s["base_eval_loss"]
    assert s["perplexity"] == pytest.approx(2.718281828 ** s["eval_loss"], rel=1e-6)
    assert s["winner"] is True and s["p_value"] < 0.01
    doc = json.loads((stage / "evaluation_results.json").read_text())
    assert len(doc["samples"]) == 3 and doc["samples"][0]["reference"].startswith("Here is a short note on")
    assert {"tuned", "base", "prompt"} <= set(doc["samples"][0])
    page = parse_report(stage / "report.html")
    assert len(page.images) == 1 and page.external == []
    assert "Sample generations" in " ".join(page.text)
