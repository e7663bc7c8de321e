"""The main job end to end through the daemon: demo data in the inbox -> a registered, exported model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, jobs_json

DEMO = REPO / "configs" / "demo"


@pytest.mark.slow
def test_demo_job_runs_every_stage_and_publishes_a_verified_model(home: Path) -> None:
    job = yaml.safe_load((DEMO / "demo_job.yaml").read_text())
    job["train"]["epochs"] = 2  # half the demo's training: this test is about the pipeline, not accuracy
    (home / "inbox" / "demo.yaml").write_text(yaml.safe_dump(job))
    (home / "inbox" / "demo_safety.jsonl").write_bytes((DEMO / "demo_safety.jsonl").read_bytes())

    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(home)],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (done,) = jobs_json(home)
    assert done["state"] == "succeeded", done["error"]
    assert [s["state"] for s in done["stages"]] == ["succeeded"] * 4
    assert "held-out accuracy" in run.stderr and f"model in {home / 'models' / 'demo-safety' / 'v1'}" in run.stderr

    model_dir = home / "models" / "demo-safety" / "v1"
    export = done["stages"][3]["artifacts"]
    assert Path(export["model_dir"]) == model_dir and not (home / "jobs" / done["id"] / "export" / "model").exists()
    for name in ("gguf_f16", "gguf_q8_0", "modelfile", "model_card", "merged", "adapter"):
        assert Path(export[name]).exists() and Path(export[name]).is_relative_to(model_dir), name
    assert "FROM ./demo-safety-q8_0.gguf" in (model_dir / "Modelfile").read_text()

    models = json.loads(subprocess.run([sys.executable, "-m", "daemon.cli", "models", "--json", "--home", str(home)],
                                       capture_output=True, text=True, cwd=REPO, check=True).stdout)["models"]
    (entry,) = models
    assert (entry["name"], entry["version"], entry["job_id"]) == ("demo-safety", 1, done["id"])
    assert entry["rows"]["original"] == 320 and entry["train_loss"] is not None
    assert entry["metrics"]["accuracy"] == done["stages"][2]["summary"]["accuracy"]
    assert Path(entry["artifacts"]["gguf_f16"]).is_relative_to(model_dir)
