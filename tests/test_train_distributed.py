"""Distributed training on CPU: two ranks on the gloo backend under the real torchrun, on the builtin tiny model.

The reference is one process with the same global batch; two ranks split each step's rows, so their loss
curve matches it up to the order of floating-point sums. A rank killed with SIGKILL fails the stage with a
message that says so, and the run resumes from the newest checkpoint, here with a different number of ranks.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from daemon.launch import stage_command
from handlers.train.checkpoints import newest_complete_checkpoint
from train_fixtures import (REPO, adapter_tensors, demo_examples, make_train_stage, metric_rows, run_stage,
                            split_by_hash, uninterrupted_run, wait_for_step)
from trainbox.jobspec import TrainSpec

pytestmark = pytest.mark.slow

TOTAL = 12
TRAIN = {"max_steps": TOTAL, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
         "max_seq_length": 96, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "eval_every_steps": 6,
         "device": "cpu", "checkpoint": {"every_steps": 4, "keep": 2, "interval_seconds": 3600},
         "progress_log": {"interval_seconds": 0.5}}
TWO_RANKS = {**TRAIN, "distributed": {"devices": 2}}
TOLERANCE = 1e-5  # two ranks sum the same numbers in another order
WEIGHT_TOLERANCE = 1e-4  # Adam turns those tiny gradient differences into weight differences of up to ~1e-5


@pytest.fixture(scope="module")
def splits():
    return split_by_hash(demo_examples())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, splits):
    """One process, same global batch: the curve two ranks must reproduce."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), splits, TRAIN)


def start_ranks(stage: Path, train: dict) -> subprocess.Popen:
    """The train stage as the daemon starts it with ``devices: 2``: torchrun with two ranks."""
    command = stage_command("train", stage, TrainSpec.model_validate(train), 2, "test", shutdown_seconds=60)
    log = open(stage.parent / "child.log", "ab")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == str(rank))


def assert_matches(stage: Path, reference: Path) -> None:
    got, want = metric_rows(stage), metric_rows(reference)
    assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), f"step {a['step']}"
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
        if b["eval_loss"] is not None:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=TOLERANCE, rel=0)
    mine, theirs = adapter_tensors(stage), adapter_tensors(reference)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) <= WEIGHT_TOLERANCE


def test_sigkill_of_a_rank_fails_the_stage_cleanly_and_it_resumes_with_another_rank_count(reference, splits,
                                                                                          tmp_path):
    stage = make_train_stage(tmp_path, splits, TWO_RANKS, home=reference.parents[1] / "home")
    launcher = start_ranks(stage, TWO_RANKS)
    wait_for_step(launcher, stage, 6)
    two_rank_rows = metric_rows(stage)
    rank_process(launcher, 1).send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) == 1, (tmp_path / "job" / "child.log").read_text()
    log = (tmp_path / "job" / "child.log").read_text()
    assert "SIGKILL" in log  # torchrun's summary names the killed rank
    error = json.loads((stage / "result.json").read_text())["error"]
    assert "lost contact with another rank" in error and "resumes from it" in error
    checkpoint = newest_complete_checkpoint(stage / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 4 and checkpoint.step % 4 == 0
    for a, b in zip(two_rank_rows, metric_rows(reference)):  # what the two ranks trained before the kill
        assert a["loss"] == pytest.approx(b["loss"], abs=TOLERANCE, rel=0), f"step {a['step']}"

    # resume in one process: the checkpoint does not depend on how many ranks wrote it
    assert run_stage(stage) == 0, (tmp_path / "job" / "child.log").read_text()
    result = json.loads((stage / "result.json").read_text())
    assert result["summary"]["resumed_from_step"] == checkpoint.step
    assert_matches(stage, reference)

