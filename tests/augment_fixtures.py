"""An augment stage directory without the daemon: prepare's splits of the persona fixture plus a stage.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainbox.rows import read_examples

REPO = Path(__file__).resolve().parents[1]
PERSONA = REPO / "tests" / "fixtures" / "persona" / "persona_chats.jsonl"


def make_augment_stage(root: Path, augment: dict[str, Any], rows: int | None = None, seed: int = 7,
                       home: Path | None = None) -> Path:
    """``root/job/prepare/splits/train.jsonl`` (the first ``rows`` persona rows) and ``root/job/augment/stage.json``;
    ``home`` (default ``root/home``) holds the llm backend's cache."""
    examples = read_examples(PERSONA)[1][:rows]
    prepare, stage = root / "job" / "prepare", root / "job" / "augment"
    (prepare / "splits").mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    (prepare / "splits" / "train.jsonl").write_text("".join(ex.to_json() + "\n" for ex in examples), encoding="utf-8")
    job = {"name": "persona", "datasets": ["persona_chats.jsonl"], "seed": seed,
           "stages": ["prepare", "augment", "train"], "augment": augment}
    spec = {"job_id": "job-1", "stage": "augment", "home": str(home or root / "home"), "job": job, "datasets": [],
            "stage_dirs": {"prepare": str(prepare), "augment": str(stage)},
            "results": {"prepare": {"state": "succeeded", "artifacts": {"train": "splits/train.jsonl"}}},
            "device": "cpu"}
    (stage / "stage.json").write_text(json.dumps(spec), encoding="utf-8")
    return stage


def start_augment(stage: Path) -> subprocess.Popen:
    """``python -m handlers augment DIR`` as a real child process, its log next to the stage dir."""
    log = open(stage.parent / "augment.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "handlers", "augment", str(stage)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                           "HF_HUB_OFFLINE": "1"})


def run_augment_child(stage: Path, timeout: float = 300) -> int:
    return start_augment(stage).wait(timeout=timeout)


def augmented_rows(stage: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage / "augmented" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
