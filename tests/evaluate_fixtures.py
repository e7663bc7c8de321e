"""Build evaluate stage directories without the daemon: prepare's splits, a really trained adapter from the
train stage (a real child process), and the evaluate stage.json the daemon would write."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from handlers.context import load_context
from trainbox.protocol import RESULT_FILE, write_record
from trainbox.rows import Example

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import demo_examples, make_train_stage, run_stage, split_by_hash  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

LABELS = ["ALLOW", "DENY", "ESCALATION", "REFUSE"]
# enough steps for the tiny model to learn the demo labels on 2 CPU cores in ~15 s
DEMO_TRAIN = {"max_steps": 80, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0,
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}


def demo_splits(test: float = 0.3) -> dict[str, list[Example]]:
    return split_by_hash(demo_examples(), val=0.15, test=test)


def train_demo(root: Path, splits: dict[str, list[Example]], train: dict[str, Any] | None = None,
               seed: int = 42, home: Path | None = None) -> Path:
    """Run the real train stage as a child process; returns its stage directory (with result.json)."""
    stage = make_train_stage(root, splits, train=train or DEMO_TRAIN, seed=seed, home=home)
    code = run_stage(stage, timeout=600)
    assert code == 0, (stage.parent / "child.log").read_text(errors="replace")[-3000:]
    return stage


def make_eval_stage(train_dir: Path, evaluate: dict[str, Any] | None = None,
                    labels: list[str] | None = None, previous_model: dict[str, Any] | None = None,
                    model: dict[str, Any] | None = None, name: str = "evaluate") -> Path:
    """An evaluate stage dir next to ``train_dir`` whose stage.json points at prepare's splits and the adapter."""
    train_spec = json.loads((train_dir / "stage.json").read_text())
    prepare_dir = Path(train_spec["stage_dirs"]["prepare"])
    stage = train_dir.parent / name
    stage.mkdir(parents=True, exist_ok=True)
    results = dict(train_spec["results"])
    results["prepare"] = {**results["prepare"],
                          "summary": {"labels": {label: 1 for label in (labels or LABELS)}}}
    results["train"] = json.loads((train_dir / RESULT_FILE).read_text())
    job = {**train_spec["job"], "stages": ["prepare", "train", "evaluate"], "evaluate": evaluate or {}}
    spec = {**train_spec, "stage": "evaluate", "job": job, "results": results,
            "stage_dirs": {"prepare": str(prepare_dir), "train": str(train_dir), "evaluate": str(stage)},
            "previous_model": previous_model, "model": model or {"name": job["name"], "version": 1}}
    (stage / "stage.json").write_text(json.dumps(spec), encoding="utf-8")
    return stage


def run_evaluate(stage: Path) -> Any:
    """The evaluate stage in-process (same code as the child), with result.json written like the runner."""
    from handlers.evaluate import run

    result = run(load_context(stage))
    write_record(stage / RESULT_FILE, result)
    return result
