"""Exact resume of the train stage across SIGKILL, SIGTERM and a crash in the middle of a checkpoint write.

Every run is a real ``python -m handlers train DIR`` child on the builtin tiny model; the reference is an
uninterrupted run with the same settings. Dropout and gradient accumulation are on, so RNG state and
data position both have to come back exactly.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handlers.train.checkpoints import MANIFEST, list_complete_checkpoints, newest_complete_checkpoint
from handlers.train.metrics import LOSS_TERMS
from train_fixtures import (REPO, adapter_tensors, all_kinds_examples, demo_examples, kill, make_train_stage,
                            metric_rows, run_stage, split_by_hash, start_stage, uninterrupted_run, wait_for_step)

pytestmark = pytest.mark.slow

TOTAL = 40
TRAIN = {"max_steps": TOTAL, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
         "max_seq_length": 96, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}, "eval_every_steps": 10,
         "checkpoint": {"every_steps": 4, "keep": 2, "interval_seconds": 3600},
         "progress_log": {"interval_seconds": 0.3}, "monitor": {"every_n_steps": 5}}
SEED = int(__import__("os").environ.get("TRAINBOX_TEST_SEED", "20261125"))


@pytest.fixture(scope="module")
def splits():
    return split_by_hash(demo_examples())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, splits):
    """One uninterrupted run: the numbers every interrupted run must reproduce."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), splits, TRAIN,
                             settings={"resources": {"ram_percent": 0.0}})


def _stage_like(reference: Path, tmp_path: Path, splits, train: dict = TRAIN) -> Path:
    # share the reference's model cache so the tiny model is built once per module
    return make_train_stage(tmp_path, splits, train, home=reference.parents[2] / "home")


def _assert_same_run(stage: Path, reference: Path, total: int = TOTAL) -> None:
    got, want = metric_rows(stage), metric_rows(reference)
    assert [r["step"] for r in got] == list(range(1, total + 1))
    for a, b in zip(got, want):
        for key in ("loss", *LOSS_TERMS):
            if b[key] is None:
                assert a[key] is None, f"step {a['step']} {key}"
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), f"step {a['step']} {key}"
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
        if b["eval_loss"] is not None:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6, rel=0)
    mine, theirs = adapter_tensors(stage), adapter_tensors(reference)
    assert mine.keys() == theirs.keys() and len(mine) > 0
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert worst <= 1e-6, f"adapter weights differ by {worst}"


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, splits, tmp_path):
    stage = _stage_like(reference, tmp_path, splits)
    target = random.Random(SEED).randint(5, 25)
    proc = start_stage(stage)
    seen = wait_for_step(proc, stage, target)
    assert kill(proc, signal.SIGKILL) == -signal.SIGKILL
    assert not (stage / "result.json").exists()
    killed_at = metric_rows(stage)[-1]["step"]
    assert killed_at < TOTAL, "the child finished before it could be killed"

    assert run_stage(stage) == 0, (tmp_path / "job" / "child.log").read_text()
    assert "micro-batches packed without padding" in (tmp_path / "job" / "child.log").read_text()  # the default
    result = json.loads((stage / "result.json").read_text())
    resumed = result["summary"]["resumed_from_step"]
    assert resumed is not None and 0 < resumed <= killed_at and resumed % 4 == 0, (seen, killed_at, resumed)
    _assert_same_run(stage, reference)


KINDS_TOTAL = 16
KINDS_TRAIN = {**TRAIN, "max_steps": KINDS_TOTAL}


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory, reference):
    """Originals, style / scenario / relationship rows and hard-negative pairs, and one uninterrupted run."""
    splits = split_by_hash(all_kinds_examples())
    return splits, uninterrupted_run(tmp_path_factory.mktemp("kinds"), splits, KINDS_TRAIN,
                                     home=reference.parents[2] / "home", settings={"resources": {"ram_percent": 0.0}})


def test_sigkill_then_resume_is_exact_for_every_loss_term(all_kinds, tmp_path):
    splits, reference = all_kinds
    want = metric_rows(reference)
    for key in LOSS_TERMS:  # every term has rows in some step
        assert any(r[key] is not None for r in want), key
    assert all(r["loss_contrastive"] is not None for r in want)
    stage = _stage_like(reference, tmp_path, splits, KINDS_TRAIN)
    target = random.Random(SEED).randint(5, KINDS_TOTAL - 4)
    proc = start_stage(stage)
    wait_for_step(proc, stage, target)
    assert kill(proc, signal.SIGKILL) == -signal.SIGKILL
    assert metric_rows(stage)[-1]["step"] < KINDS_TOTAL, "the child finished before it could be killed"
    assert run_stage(stage) == 0, (tmp_path / "job" / "child.log").read_text()
    assert json.loads((stage / "result.json").read_text())["summary"]["resumed_from_step"] >= 4
    _assert_same_run(stage, reference, KINDS_TOTAL)


def test_sigterm_saves_an_emergency_checkpoint_exits_75_and_resume_completes(reference, splits, tmp_path):
    stage = _stage_like(reference, tmp_path, splits)
    proc = start_stage(stage)
    wait_for_step(proc, stage, 7)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # a second signal while stopping must not corrupt the save
    assert proc.wait(timeout=120) == 75
    newest = newest_complete_checkpoint(stage / "checkpoints")
    assert newest is not None
    assert newest.step == metric_rows(stage)[-1]["step"]  # nothing trained after the checkpoint is lost
    # the stop lands on a step boundary; where a rolling checkpoint was just written there, it is reused
    assert newest.kind == ("rolling" if newest.step % 4 == 0 else "emergency")
    assert "stopped at step" in (tmp_path / "job" / "child.log").read_text()

    assert run_stage(stage) == 0
    result = json.loads((stage / "result.json").read_text())
    assert result["summary"]["resumed_from_step"] == newest.step
    _assert_same_run(stage, reference)


WRITER = """
import sys, time
from pathlib import Path
from handlers.train.checkpoints import write_checkpoint_atomically

def write(folder):
    (folder / "optimizer.pt").write_bytes(b"x" * 100000)
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)

write_checkpoint_atomically(Path(sys.argv[1]), 10**6, "rolling", write)
"""


def test_kill_during_a_checkpoint_write_leaves_a_dir_that_resume_skips(reference, splits, tmp_path):
    stage = _stage_like(reference, tmp_path, splits)
    proc = start_stage(stage)
    wait_for_step(proc, stage, 14)
    assert kill(proc, signal.SIGTERM) == 75
    root = stage / "checkpoints"
    good = [c.step for c in list_complete_checkpoints(root)]
    assert len(good) >= 2

    # a writer killed half way through: a temp dir without a manifest
    marker = tmp_path / "marker"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(marker)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kill(writer, signal.SIGKILL) == -signal.SIGKILL
    assert [p.name for p in root.glob(".tmp-step-*")], "the killed writer should have left its temp dir"
    # and the newest complete-looking checkpoint is torn: a file no longer matches its manifest
    newest = root / f"step-{good[-1]:08d}"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    # a renamed dir whose manifest never arrived
    shutil.copytree(root / f"step-{good[0]:08d}", root / "step-99999999")
    (root / "step-99999999" / MANIFEST).unlink()

    assert run_stage(stage) == 0
    log = (tmp_path / "job" / "child.log").read_text()
    assert "interrupted while being written" in log and "does not match its manifest" in log
    result = json.loads((stage / "result.json").read_text())
    assert result["summary"]["resumed_from_step"] == good[-2]
    assert not list(root.glob(".tmp-*"))
    assert not (root / "step-99999999").exists() and not newest.exists()  # set aside, never trusted again
    _assert_same_run(stage, reference)


def test_rotation_keeps_exactly_keep_rolling_plus_epoch_and_final(reference):
    kinds = {c.step: c.kind for c in list_complete_checkpoints(reference / "checkpoints")}
    # 254 rows / batch 4 / accumulation 2 = 32 steps per epoch; rolling every 4 steps, keep 2
    assert kinds == {28: "rolling", 32: "epoch", 36: "rolling", 40: "final"}
    manifest = json.loads((reference / "checkpoints" / "step-00000040" / MANIFEST).read_text())
    assert manifest["step"] == 40 and manifest["files"]["optimizer.pt"]["bytes"] > 0
    assert set(manifest["files"]) >= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                      "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
