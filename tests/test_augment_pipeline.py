"""configs/jobs/persona_augmented.yaml end to end through the daemon on CPU: prepare -> augment (rules backend,
packaged encoder) -> train on the augmented split -> evaluate -> export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, jobs_json

CONFIGS = REPO / "configs"


@pytest.mark.slow
def test_persona_augmented_job_runs_every_stage(home: Path) -> None:
    job = yaml.safe_load((CONFIGS / "jobs" / "persona_augmented.yaml").read_text())
    job["train"].update(epochs=1, max_steps=8)  # the pipeline is under test here, not the persona
    job["evaluate"].update(max_examples=8, generate_examples=2, samples=1, latency_examples=2,
                           bootstrap_samples=100)
    (home / "inbox" / "persona.yaml").write_text(yaml.safe_dump(job))
    (home / "inbox" / "persona_chats.jsonl").write_bytes((CONFIGS / "demo" / "persona_chats.jsonl").read_bytes())

    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(home)],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (done,) = jobs_json(home)
    assert done["state"] == "succeeded", done["error"]
    stages = {s["name"]: s for s in done["stages"]}
    assert list(stages) == ["prepare", "augment", "train", "evaluate", "export"]
    assert all(s["state"] == "succeeded" for s in stages.values())

    augment, train = stages["augment"]["summary"], stages["train"]["summary"]
    original = stages["prepare"]["summary"]["rows"]["train"]
    assert augment["rows_original"] == original and augment["rows_total"] == 3 * original
    assert augment["rows_per_kind"]["hard_negative"] > 0
    assert train["train_rows"] == augment["rows_total"]  # the augmented split, pairs feeding the contrastive term
    assert all(train["final_loss_terms"][t] is not None
               for t in ("loss_generation", "loss_style", "loss_relationship", "loss_contrastive"))
    assert f"{original} -> {3 * original}, 3.00x" in stages["augment"]["message"]

    show = subprocess.run([sys.executable, "-m", "daemon.cli", "show", done["id"], "--home", str(home)],
                          capture_output=True, text=True, cwd=REPO, check=True, env={"COLUMNS": "200",
                                                                                      **_env()})
    assert f"{original} -> {3 * original}, 3.00x" in show.stdout
    models = json.loads(subprocess.run([sys.executable, "-m", "daemon.cli", "models", "--json", "--home",
                                        str(home)], capture_output=True, text=True, cwd=REPO, check=True).stdout)
    (entry,) = models["models"]
    assert entry["rows"] == {"original": 80, "augmented": 80 + 2 * original}  # all splits, train grown 3x


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
