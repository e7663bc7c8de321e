"""Sweeps through the real daemon: trials are child jobs with a shared prepare, the tiny model trains for real,
Optuna's median pruner stops trials, and a daemon SIGKILLed three times mid-sweep ends with exactly the trials
and the best trial of an uninterrupted sweep with the same seed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FAST_SETTINGS, REPO, DaemonProcess, jobs_json, wait_for
from daemon.layout import Layout
from trainbox.study import open_study

DATA = REPO / "configs" / "demo" / "demo_safety.jsonl"
TRIALS = 2
SWEEP_JOB = {
    "name": "tiny-sweep", "kind": "sweep", "datasets": ["demo_safety.jsonl"], "base_model": "builtin:tiny",
    "stages": ["prepare", "train"], "seed": 7,
    "prepare": {"max_rows": 96, "split": {"train": 0.7, "val": 0.2, "test": 0.1}},
    "train": {"max_steps": 6, "batch_size": 8, "max_seq_length": 64, "eval_every_steps": 2,
              "checkpoint": {"every_steps": 2}},
    "sweep": {"trials": TRIALS, "metric": "final_eval_loss", "direction": "minimize", "pruner": "median",
              "params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                         "train.lora.r": {"type": "categorical", "choices": [4, 8]}}},
}


def new_home(root: Path, trials: int = TRIALS, max_steps: int = 6) -> Path:
    home = root / "home"
    Layout(home).create()
    (home / "daemon.yaml").write_text(yaml.safe_dump(FAST_SETTINGS), encoding="utf-8")
    job = {**SWEEP_JOB, "sweep": {**SWEEP_JOB["sweep"], "trials": trials},
           "train": {**SWEEP_JOB["train"], "max_steps": max_steps}}
    (home / "inbox" / "sweep.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    (home / "inbox" / "demo_safety.jsonl").write_bytes(DATA.read_bytes())
    return home


def run_once(home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(home)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def outcome(home: Path) -> dict:
    """The sweep as the store and the study record it."""
    jobs = jobs_json(home)
    (sweep,) = [j for j in jobs if j["parent"] is None]
    trials = [j for j in jobs if j["parent"] == sweep["id"]]
    study = open_study(f"sqlite:///{home / 'state' / 'optuna.db'}", sweep["id"], "minimize")
    return {"sweep": sweep, "jobs": trials, "study": study.get_trials(),
            "best": (study.best_trial.number, study.best_trial.params, study.best_trial.value)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    home = new_home(tmp_path_factory.mktemp("uninterrupted"))
    run_once(home)
    return {"home": home, **outcome(home)}


def test_a_sweep_runs_its_trials_as_child_jobs_and_reports(reference) -> None:
    sweep, trials, home = reference["sweep"], reference["jobs"], reference["home"]
    assert sweep["state"] == "succeeded", sweep["error"]
    assert [s["name"] for s in sweep["stages"]] == ["prepare", "sweep"]
    assert sorted(j["trial"]["number"] for j in trials) == list(range(TRIALS))
    for job in trials:  # the sweep's children in the --json shape; prepare is the sweep's, each trial trains in its own folder with checkpoints
        assert job["parent"] == sweep["id"] and job["name"] == f"tiny-sweep.t{job['trial']['number']:03d}"
        assert [s["name"] for s in job["stages"]] == ["prepare", "train"]
        assert not (home / "jobs" / job["id"] / "prepare").exists()
        assert set(job["trial"]["params"]) == {"train.learning_rate", "train.lora.r"}
        assert job["trial"]["state"] in ("complete", "pruned")
        if job["trial"]["state"] == "pruned":
            step = job["stages"][1]["summary"]["pruned_at_step"]
            assert job["trial"]["note"] == f"pruned at step {step}" and step < 6
        else:
            assert any((home / "jobs" / job["id"] / "train" / "checkpoints").iterdir())
    summary = sweep["stages"][1]["summary"]
    assert (summary["best_trial"], summary["best_params"]) == reference["best"][:2]
    assert summary["trials"] == TRIALS and summary["complete"] + summary["pruned"] == TRIALS
    report = home / "jobs" / sweep["id"] / "sweep"
    for name in ("report.html", "sweep.json", "trials.csv", "optimization_history.png", "slice.png"):
        assert (report / name).is_file(), name
    assert len((report / "trials.csv").read_text().splitlines()) == TRIALS + 1
    assert json.loads((report / "sweep.json").read_text())["best"]["trial"] == reference["best"][0]
    assert "best trial" in sweep["stages"][1]["message"]


def test_sigkill_three_times_keeps_every_trial_once_and_the_same_best(reference, tmp_path) -> None:
    home = new_home(tmp_path)
    kills = 0
    # kill -9 while trial 0 trains (after its first checkpoint, then after a later one) and while trial 1 does
    for trial, step in ((0, 2), (0, 4), (1, 2)):
        daemon = DaemonProcess(home).wait_ready(timeout=60)
        wait_for(lambda: checkpointed(home, trial, step), timeout=300, what=f"trial {trial}'s step {step} checkpoint")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon.log.close()
        kills += 1
    run_once(home)
    killed = outcome(home)
    assert kills == 3 and killed["sweep"]["state"] == "succeeded", killed["sweep"]["error"]
    assert len(killed["study"]) == TRIALS and all(t.state.is_finished() for t in killed["study"])
    assert sorted(j["trial"]["number"] for j in killed["jobs"]) == list(range(TRIALS))  # none asked twice
    assert killed["best"][:2] == reference["best"][:2]
    assert killed["best"][2] == pytest.approx(reference["best"][2], rel=1e-5)
    for mine, theirs in zip(killed["study"], reference["study"]):
        assert (mine.state, mine.params) == (theirs.state, theirs.params)
    resumed = [j["stages"][1]["summary"].get("resumed_from_step") for j in killed["jobs"]]
    assert any(resumed), f"no trial resumed from a checkpoint: {resumed}"


def checkpointed(home: Path, number: int, step: int = 2) -> bool:
    """Trial ``number`` has a complete checkpoint at ``step`` or later (or has finished training)."""
    folder = next((home / "jobs").glob(f"*.t{number:03d}-*/train"), None)
    if folder is None:
        return False
    steps = [int(p.parent.name.split("-")[-1]) for p in folder.glob("checkpoints/*/manifest.json")]
    return max(steps, default=0) >= step or (folder / "result.json").exists()


def test_cancel_stops_the_trials_and_retry_continues_the_sweep(tmp_path) -> None:
    home = new_home(tmp_path, trials=1)
    daemon = DaemonProcess(home).wait_ready(timeout=60)
    try:
        trial = wait_for(lambda: next((j for j in jobs_json(home) if j["parent"] and j["state"] == "running"), None),
                         timeout=300, what="trial 0 running")
        cli("cancel", trial["parent"], home=home)
        wait_for(lambda: all(j["state"] == "cancelled" for j in jobs_json(home)), timeout=120,
                 what="the sweep and its trial cancelled")
        refused = cli("retry", trial["id"], home=home, check=False)
        assert refused.returncode == 2 and "retry the sweep instead" in refused.stderr + refused.stdout
        cli("retry", trial["parent"], home=home)
        wait_for(lambda: next(j for j in jobs_json(home) if j["parent"] is None)["state"] == "succeeded",
                 timeout=400, what="the retried sweep to finish")
    finally:
        daemon.stop()
    jobs = jobs_json(home)
    assert [j["trial"]["number"] for j in jobs if j["parent"]] == [0]  # continued, not sampled again
    first = next(j for j in jobs if j["parent"])
    assert first["state"] == "succeeded" and first["attempts"] >= 2 and first["trial"]["state"] == "complete"


def cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, cwd=REPO)
    if check:
        assert done.returncode == 0, done.stderr
    return done
