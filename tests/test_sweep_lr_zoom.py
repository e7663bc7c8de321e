"""lr_zoom through the real daemon: zoom stages of real (tiny) trainings, the cumulative JSON, a PNG per stage
and optimal_lr.json (what a second run of the job name skips: test_sweep_rules, on a real study)."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import FAST_SETTINGS, REPO, jobs_json
from daemon.layout import Layout
from trainbox.lrzoom import SAME_LR
from test_sweep_daemon import run_once

DATA = REPO / "configs" / "demo" / "demo_safety.jsonl"
JOB = {"name": "lr-search", "kind": "sweep", "datasets": ["demo_safety.jsonl"], "stages": ["prepare", "train"],
       "seed": 3, "prepare": {"max_rows": 64, "split": {"train": 0.7, "val": 0.2, "test": 0.1}},
       "train": {"max_steps": 2, "batch_size": 8, "max_seq_length": 64},
       "sweep": {"method": "lr_zoom", "zoom": "2-2", "metric": "final_eval_loss", "pruner": "none",
                 "params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}}}


def test_lr_zoom_writes_cumulative_json_stage_pngs_and_optimal_lr(tmp_path) -> None:
    home = tmp_path / "home"
    Layout(home).create()
    (home / "daemon.yaml").write_text(yaml.safe_dump(FAST_SETTINGS), encoding="utf-8")
    (home / "inbox" / "demo_safety.jsonl").write_bytes(DATA.read_bytes())
    (home / "inbox" / "lr.yaml").write_text(yaml.safe_dump(JOB), encoding="utf-8")
    run_once(home)
    folder = home / "sweeps" / "lr-search"
    first = json.loads((folder / "lr_sweep_cumulative.json").read_text())["points"]
    assert sorted(p["learning_rate"] for p in first if p["stage"] == 0) == pytest.approx([1e-4, 1e-1])  # the ends
    zoomed = [p["learning_rate"] for p in first if p["stage"] == 1]
    stage0 = [p["learning_rate"] for p in first if p["stage"] == 0]
    assert zoomed and all(1e-4 <= lr <= 1e-1 and all(abs(lr / t - 1) > SAME_LR for t in stage0) for lr in zoomed)
    for name in ("lr_zoom_stage_0.png", "lr_zoom_stage_1.png", "optimal_lr.json"):
        assert (folder / name).is_file(), name
    optimal = json.loads((folder / "optimal_lr.json").read_text())
    assert optimal["value"] == min(p["value"] for p in first if p["value"] is not None)
    (sweep,) = [j for j in jobs_json(home) if j["parent"] is None]
    assert sweep["state"] == "succeeded", sweep["error"]
    assert (home / "jobs" / sweep["id"] / "sweep" / "lr_zoom_stage_1.png").is_file()
