"""What a finished train stage leaves behind: result contract, metrics, plots, reports, progress logs, events."""
from __future__ import annotations

import csv
import json

import pytest

from handlers.context import load_context
from handlers.train import run
from handlers.train.checkpoints import list_complete_checkpoints
from handlers.train.metrics import COLUMNS
from handlers.train.progress import TRAINING_FIELDS
from train_fixtures import demo_examples, make_train_stage, split_by_hash

SYSTEM_FIELDS = ("cpu_percent", "ram_percent", "gpus", "gpu_utilization_percent", "gpu_memory_used_mib",
                 "gpu_memory_total_mib", "gpu_temperature_c")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    stage = make_train_stage(root, split_by_hash(demo_examples()), {
        "max_steps": 12, "batch_size": 8, "max_seq_length": 96, "eval_every_steps": 4,
        "lora": {"r": 4, "alpha": 8}, "progress_log": {"interval_seconds": 0.05}, "monitor": {"every_n_steps": 3},
        "checkpoint": {"interval_seconds": 0.05, "keep": 1}, "tensorboard": True},
        settings={"resources": {"ram_percent": 0.0, "check_seconds": 0.05}})
    result = run(load_context(stage))
    return stage, result


def test_result_follows_the_stage_contract(finished):
    stage, result = finished
    for name in ("adapter", "tokenizer", "checkpoints", "metrics_jsonl", "metrics_csv", "plot", "report",
                 "progress_summary"):
        assert (stage / result.artifacts[name]).exists(), name
    assert (stage / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((stage / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (stage / "tokenizer" / "tokenizer.json").exists()
    s = result.summary
    assert s["total_steps"] == 12 and s["resumed_from_step"] is None
    assert s["min_loss"] <= s["final_loss"] and s["tokens_per_s"] > 0 and s["train_seconds"] > 0
    assert s["base_model_path"].endswith("builtin-tiny-v1") and s["method"] == "lora" and s["device"] == "cpu"
    assert result.model == {"train_loss": s["final_loss"], "base_model": "builtin:tiny"}
    assert result.model_artifacts == {"adapter": "adapter"} and result.publish is None
    assert s["modules_not_learning"] == []


def test_metrics_files_have_one_row_per_step_with_the_documented_columns(finished):
    stage, _ = finished
    rows = [json.loads(line) for line in (stage / "metrics" / "training_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert all(r["loss"] > 0 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0 for r in rows)
    evals = [r for r in rows if r["eval_loss"] is not None]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(abs(r["perplexity"] - __import__("math").exp(r["eval_loss"])) < 1e-6 * r["perplexity"] for r in evals)
    with open(stage / "metrics" / "training_metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == COLUMNS and len(table) == 12
    assert float(table[-1]["loss"]) == pytest.approx(rows[-1]["loss"])
    png = (stage / "plots" / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_has_config_timings_history_and_per_metric_stats(finished):
    stage, result = finished
    report = json.loads((stage / result.artifacts["report"]).read_text())
    assert report["config"]["job"]["train"]["max_steps"] == 12 and report["config"]["plan"]["method"] == "lora"
    assert report["total_steps"] == 12 and report["duration_s"] > 0 and report["started"] <= report["ended"]
    assert len(report["history"]) == 12
    loss = report["stats"]["loss"]
    assert loss["min"] <= loss["mean"] <= loss["max"] and loss["final"] == report["history"][-1]["loss"]
    assert loss["std"] >= 0 and loss["count"] == 12
    assert report["files"]["metrics_csv"] == "metrics/training_metrics.csv"
    assert report["monitor"]["checks"] == 4 and report["monitor"]["trainable_modules"] == 14
    with open(stage / result.artifacts["summary_csv"], newline="") as fh:
        table = {r["metric"]: r for r in csv.DictReader(fh)}
    assert float(table["loss"]["final"]) == pytest.approx(loss["final"])


def test_progress_logs_and_summary_have_the_documented_fields(finished):
    stage, _ = finished
    logs = sorted((stage / "progress_logs").glob("progress_*.json"))
    assert len(logs) >= 2  # at the start, periodically, at the end
    for path in logs:
        record = json.loads(path.read_text())
        assert set(TRAINING_FIELDS) | set(SYSTEM_FIELDS) <= set(record), path.name
        assert record["gpus"] == [] and record["gpu_temperature_c"] is None  # no GPU on this machine
        assert 0 <= record["ram_percent"] <= 100
    summary = json.loads((stage / "progress_summary.json").read_text())
    assert summary["step"] == 12 and summary["total_steps"] == 12 and summary["eta_s"] == 0.0
    assert summary["logs_written"] == len(logs) and summary["latest"]["step"] == 12
    progress = json.loads((stage / "progress.json").read_text())
    assert set(TRAINING_FIELDS) <= set(progress) and progress["stage"] == "train"
    assert progress["step"] == 12 and progress["eta_s"] == 0.0  # the last report is forced past the throttle


def test_resource_warnings_reach_the_daemon_rate_limited(finished):
    stage, _ = finished
    events = [json.loads(line) for line in (stage / "events.jsonl").read_text().splitlines()]
    ram = [e for e in events if e["kind"] == "resource_warning" and e["resource"] == "ram"]
    assert len(ram) == 1  # sampled every 0.05 s, reported once per 10 minutes
    assert "RAM use is" in ram[0]["message"] and "batch_size" in ram[0]["message"]


def test_timed_checkpoints_come_from_the_scheduler_and_rotate(finished):
    stage, result = finished
    kinds = [c.kind for c in list_complete_checkpoints(stage / "checkpoints")]
    assert kinds.count("final") == 1 and kinds.count("rolling") == 1  # keep: 1
    assert result.summary["checkpoints_written"] >= 2  # at least one timed rolling checkpoint, then the final


def test_tensorboard_event_files_hold_the_step_metrics(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage, _ = finished
    events = EventAccumulator(str(stage / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, 13))
    rows = [json.loads(line) for line in (stage / "metrics" / "training_metrics.jsonl").read_text().splitlines()]
    assert [round(e.value, 4) for e in losses] == [round(r["loss"], 4) for r in rows]
    assert "train/eval_loss" in events.Tags()["scalars"]
