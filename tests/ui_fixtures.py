"""A prepared trainbox home: a real store with jobs in several states, stage files, events, a rejected file."""
from __future__ import annotations

import json
import os
import time

import pytest

from daemon.jobs import JobRecord, new_job
from daemon.layout import Layout
from daemon.lock import HomeLock
from daemon.store import Store, utcnow
from trainbox.jobspec import JobSpec

LOSSES = [3.2, 3.0, 2.7, 2.5, 2.2, 2.0, 1.9, 1.7, 1.6, 1.5, 1.45, 1.4]


def _job(store: Store, name: str, state: str, stage: str | None = None, **fields) -> JobRecord:
    """A job built directly in ``state`` (a fixture, not a history: records may be built in any state)."""
    job = new_job(JobSpec(name=name, datasets=["support.jsonl"]), source="inbox/job.yaml", claim=None)
    job = job.model_copy(update=dict(state=state, stage=stage, datasets=["ab" * 32], **fields))
    store.insert_job(job)
    return job


@pytest.fixture
def prepared_home(tmp_path):
    """Returns the home; a HomeLock is held and the heartbeat names this process, so the daemon looks alive."""
    home = tmp_path / "home"
    layout = Layout(home)
    layout.create()
    store = Store.for_home(home)
    store.set_meta("daemon", {"pid": os.getpid(), "started_at": "2026-01-01T00:00:00+00:00",
                              "heartbeat_at": utcnow(), "heartbeat_ts": time.time(), "version": "test"})
    running = _job(store, "support-bot", "running", "train", device="cpu")

    def stages(job: JobRecord) -> None:
        for stage in job.stages[:2]:
            stage.move_to("running")
        job.stages[0].move_to("succeeded")
        job.stages[0].summary = {"rows": {"train": 90, "val": 10}}
        job.stages[1].started_at = utcnow()
    store.update_job(running.id, stages)
    _job(store, "queued-job", "queued")
    _job(store, "needs-data", "waiting")
    failed = _job(store, "broken-job", "failed", error="train: CUDA out of memory; lower train.batch_size")
    done = _job(store, "ticket-router", "succeeded")

    def evaluated(job: JobRecord) -> None:
        for s in job.stages:
            s.move_to("running")
            s.move_to("succeeded")
            s.ended_at = utcnow()
        job.stages[2].summary = {"accuracy": 0.875, "macro_f1": 0.8312, "eval_loss": 0.4123}
    store.update_job(done.id, evaluated)

    train_dir = layout.stage_dir(running.id, "train")
    (train_dir / "metrics").mkdir(parents=True)
    rows = [{"step": i + 1, "loss": loss, "tokens_per_s": 512.0, "eval_loss": 1.8 if i == 9 else None,
             "perplexity": 6.05 if i == 9 else None} for i, loss in enumerate(LOSSES)]
    (train_dir / "metrics" / "training_metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')  # torn last line: being written
    (train_dir / "progress.json").write_text(json.dumps(
        {"stage": "train", "step": 12, "total_steps": 40, "loss": 1.4, "tokens_per_s": 512.0, "eta_s": 95}))

    (layout.rejected / "notes.jsonl").write_text("not json\n")
    (layout.rejected / "notes.jsonl.error.txt").write_text(
        "# trainbox could not use this file\nnotes.jsonl line 1: not valid JSON (Expecting value)\n")
    store.add_event("file_rejected", "notes.jsonl rejected: line 1 is not valid JSON", file="notes.jsonl")
    store.add_event("job_failed", "broken-job failed in train", job_id=failed.id)
    store.add_event("job_succeeded", "ticket-router succeeded", job_id=done.id)
    with HomeLock(home):
        yield home
