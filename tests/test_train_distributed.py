"""Distributed training on CPU: two ranks on the gloo backend under the real torchrun, on the builtin tiny model.

The reference is one process with the same global batch; two ranks split each step's rows, so their loss
curve matches it up to the order of floating-point sums. A rank killed with SIGKILL fails the stage with a
message that says so, and the run resumes from the newest checkpoint, here with a different number of ranks.
Through the real daemon, SIGTERM reaches both ranks, one emergency checkpoint is written, and the restarted
daemon resumes the job on two ranks to the same curve.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import drop, jobs_json, wait_for
from daemon.launch import stage_command
from handlers.prepare import SPLITS, split_of
from handlers.train.checkpoints import list_complete_checkpoints, newest_complete_checkpoint
from train_fixtures import (DEMO_DATA, REPO, adapter_tensors, demo_examples, make_train_stage, metric_rows,
                            run_stage, uninterrupted_run, wait_for_step)
from trainbox.jobspec import PrepareSpec, TrainSpec

pytestmark = pytest.mark.slow

TOTAL = 40
SEED = 42
TRAIN = {"max_steps": TOTAL, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
         "max_seq_length": 96, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "eval_every_steps": 10,
         "device": "cpu", "checkpoint": {"every_steps": 4, "keep": 2, "interval_seconds": 3600},
         "progress_log": {"interval_seconds": 0.5}}
TWO_RANKS = {**TRAIN, "distributed": {"devices": 2}}
TOLERANCE = 1e-5  # two ranks sum the same numbers in another order
WEIGHT_TOLERANCE = 1e-4  # Adam turns those tiny gradient differences into weight differences of up to ~1e-5


def prepared_splits() -> dict[str, list]:
    """The splits the prepare stage writes for the demo data with default settings (the daemon test checks it)."""
    rows = sorted({ex.id: ex for ex in demo_examples()}.values(), key=lambda ex: ex.id)
    random.Random(SEED).shuffle(rows)
    fractions = PrepareSpec().split.model_dump()
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for ex in rows:
        splits[split_of(ex.id, fractions)].append(ex)
    return splits


@pytest.fixture(scope="module")
def splits():
    return prepared_splits()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, splits):
    """One process, same global batch: the curve two ranks must reproduce."""
    return uninterrupted_run(tmp_path_factory.mktemp("reference"), splits, TRAIN, seed=SEED)


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
    stage = make_train_stage(tmp_path, splits, TWO_RANKS, home=reference.parents[1] / "home", seed=SEED)
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



def test_fsdp_shards_over_two_ranks_matches_the_curve_and_resumes_after_a_sigterm(reference, splits, tmp_path):
    """FSDP2 on two gloo ranks: the same curve as one process; SIGTERM gives one emergency checkpoint in the
    one-process format (same tensors as the reference's, gathered from the shards), and two ranks resume it."""
    fsdp_train = {**TRAIN, "distributed": {"devices": 2, "strategy": "fsdp"}}
    stage = make_train_stage(tmp_path, splits, fsdp_train, home=reference.parents[1] / "home", seed=SEED)
    launcher = start_ranks(stage, fsdp_train)
    seen = wait_for_step(launcher, stage, 6)
    launcher.send_signal(signal.SIGTERM)  # as the daemon stops a stage: torchrun forwards it to both ranks
    assert launcher.wait(timeout=120) == 75, (tmp_path / "job" / "child.log").read_text()
    log = (tmp_path / "job" / "child.log").read_text(encoding="utf-8")
    assert "FSDP: 2 decoder blocks and the root sharded over 2 ranks" in log
    stopped_at = metric_rows(stage)[-1]["step"]
    assert seen <= stopped_at < TOTAL
    newest = newest_complete_checkpoint(stage / "checkpoints")
    assert newest is not None and newest.step == stopped_at
    assert newest.kind == ("rolling" if stopped_at % 4 == 0 else "emergency")
    saved = torch.load(newest.path / "optimizer.pt", weights_only=True)  # the plain optimizer.state_dict() form
    weights = adapter_tensors(newest.path)
    assert len(saved["state"]) == len(weights) > 0
    assert {tuple(s["exp_avg"].shape) for s in saved["state"].values()} == {tuple(t.shape) for t in weights.values()}

    launcher = start_ranks(stage, fsdp_train)
    assert launcher.wait(timeout=240) == 0, (tmp_path / "job" / "child.log").read_text()
    result = json.loads((stage / "result.json").read_text())
    assert result["summary"]["resumed_from_step"] == stopped_at
    assert result["summary"]["strategy"] == "fsdp" and result["summary"]["ranks"] == 2
    assert_matches(stage, reference)


def cli(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, check=True, cwd=REPO).stdout


def test_sigterm_to_the_daemon_stops_both_ranks_once_and_the_job_resumes_on_two_ranks(reference, home,
                                                                                      daemon_factory):
    job = {"name": "scaled", "datasets": ["demo_safety.jsonl"], "stages": ["prepare", "train"], "seed": SEED,
           "train": TWO_RANKS}
    daemon = daemon_factory().wait_ready()
    drop(home / "inbox", "demo_safety.jsonl", DEMO_DATA.read_text(encoding="utf-8"))
    drop(home / "inbox", "job.yaml", yaml.safe_dump(job))

    def ranks_shown() -> list | None:  # both ranks' lines, read the way scripts read them
        (view,) = jobs_json(home)
        ranks = (view.get("progress") or {}).get("ranks") or []
        return view if len(ranks) == 2 and view["stage"] == "train" else None
    view = wait_for(ranks_shown, 180, "both ranks in the job's progress")
    assert view["device"] == "cpu" and sorted(r["rank"] for r in view["progress"]["ranks"]) == [0, 1]
    shown = cli(home, "show", view["id"])
    assert "rank 0" in shown and "rank 1" in shown
    daemon.signal(signal.SIGTERM)
    assert daemon.stop() == 0

    (view,) = jobs_json(home)
    assert view["state"] == "interrupted" and view["stages"][1]["state"] == "interrupted"
    stage = home / "jobs" / view["id"] / "train"
    assert (home / "jobs" / view["id"] / "prepare" / "splits" / "train.jsonl").read_text(encoding="utf-8") == "".join(
        ex.to_json() + "\n" for ex in prepared_splits()["train"])  # the reference trained on the same rows
    stage_log = (stage / "stage.log").read_text(encoding="utf-8")
    for rank in (0, 1):  # torchrun forwarded the signal to every rank
        assert f"[rank {rank}] handlers: signal 15: stopping after the current step" in stage_log
    stopped_at = metric_rows(stage)[-1]["step"]
    assert stopped_at < TOTAL, "training finished before the daemon was stopped"
    kinds = {c.step: c.kind for c in list_complete_checkpoints(stage / "checkpoints")}
    assert max(kinds) == stopped_at  # nothing trained before the stop is lost
    assert list(kinds.values()).count("emergency") == (0 if stopped_at % 4 == 0 else 1), kinds

    daemon_factory("--once").proc.wait(timeout=300)
    (view,) = jobs_json(home)
    assert view["state"] == "succeeded", view["error"]
    assert view["stages"][1]["summary"]["resumed_from_step"] == stopped_at
    assert_matches(stage, reference)
