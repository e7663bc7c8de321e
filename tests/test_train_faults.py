"""A full disk during training never fails the job: the stage trains on, waits for space where it must write,
stops resumably on a signal, and the result is the one an undisturbed run gets.

The stage directory is a real tmpfs of a few MB (mounted for the test; needs root, as in CI's container),
filled to the last byte while a real ``python -m handlers train DIR`` child is training.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import fill_disk, mounted_tmpfs
from handlers.train.checkpoints import newest_complete_checkpoint
from train_fixtures import (adapter_tensors, demo_examples, make_train_stage, metric_rows, run_stage, split_by_hash,
                            start_stage, uninterrupted_run, wait_for_step)

pytestmark = pytest.mark.slow

TOTAL = 30
TRAIN = {"max_steps": TOTAL, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
         "max_seq_length": 96, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "eval_every_steps": 10,
         "checkpoint": {"every_steps": 2, "keep": 2, "interval_seconds": 3600},
         "progress_log": {"interval_seconds": 0.2}, "monitor": {"every_n_steps": 5}}
DISK_MB = 24


@pytest.fixture(scope="module")
def splits():
    return split_by_hash(demo_examples())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, splits):
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), splits, TRAIN)


@pytest.fixture()
def small_disk(tmp_path):
    """``tmp_path/job/train`` on its own tmpfs of DISK_MB."""
    with mounted_tmpfs(tmp_path / "job" / "train", DISK_MB) as mount_point:
        yield mount_point


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"child exited with {proc.returncode} before logging {text!r}:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout} s:\n{log.read_text()}")


def assert_same_run(stage: Path, reference: Path) -> None:
    got, want = metric_rows(stage), metric_rows(reference)
    assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0), f"step {a['step']}"
    mine, theirs = adapter_tensors(stage), adapter_tensors(reference)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) <= 1e-6


def test_a_full_disk_mid_training_waits_for_space_and_completes_exactly(reference, splits, tmp_path, small_disk):
    stage = make_train_stage(tmp_path, splits, TRAIN, home=reference.parents[2] / "home")
    log = tmp_path / "job" / "child.log"
    proc = start_stage(stage)
    wait_for_step(proc, stage, 3)
    filler = fill_disk(small_disk)
    # side writes are skipped while training goes on; the final checkpoint waits for space
    wait_for_log(log, "waiting for free space", proc)
    assert "not written: No space left on device" in log.read_text()
    time.sleep(3)
    assert proc.poll() is None, "the stage must wait, not fail"
    filler.unlink()
    assert proc.wait(timeout=240) == 0, log.read_text()

    assert_same_run(stage, reference)
    result = json.loads((stage / "result.json").read_text())
    assert result["summary"]["total_steps"] == TOTAL
    events = [json.loads(line) for line in (stage / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "resource_warning" and "disk was full" in e["message"] for e in events), events


def test_a_stop_while_the_disk_is_full_exits_75_and_resumes_exactly(reference, splits, tmp_path, small_disk):
    stage = make_train_stage(tmp_path, splits, TRAIN, home=reference.parents[2] / "home")
    log = tmp_path / "job" / "child.log"
    proc = start_stage(stage)
    wait_for_step(proc, stage, 3)
    before = newest_complete_checkpoint(stage / "checkpoints")
    filler = fill_disk(small_disk)
    wait_for_log(log, "not written: No space left on device", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()
    assert not (stage / "result.json").exists()
    stopped_at = int(re.search(r"stopped at step (\d+)/", log.read_text())[1])
    newest = newest_complete_checkpoint(stage / "checkpoints")
    assert newest is not None and newest.step < stopped_at  # the emergency checkpoint found no space
    assert "resume starts from the newest checkpoint written before" in log.read_text()

    filler.unlink()
    assert run_stage(stage) == 0, log.read_text()
    resumed = json.loads((stage / "result.json").read_text())["summary"]["resumed_from_step"]
    assert resumed == newest.step and resumed >= (before.step if before else 0)
    assert_same_run(stage, reference)
