"""daemon.store: the repository methods, on a real TinyDB file reopened from disk where it matters."""
from __future__ import annotations

import time

import pytest

from daemon.jobs import IllegalTransition, JobRecord, new_job
from daemon.store import Store
from trainbox.jobspec import JobSpec


@pytest.fixture()
def store(tmp_path) -> Store:
    return Store.for_home(tmp_path)


def _add(store: Store, name: str, *, stages: list[str] | None = None, datasets: list[str] | None = None,
         created_at: str | None = None) -> JobRecord:
    spec = JobSpec.model_validate({"name": name, "datasets": datasets or [f"{name}.jsonl"],
                                   **({"stages": stages} if stages else {})})
    job = new_job(spec, source="test", claim=f"claim-{name}")
    if created_at:
        job.created_at = created_at
    store.insert_job(job)
    return job


def _queue(store: Store, job_id: str) -> JobRecord:
    def change(job: JobRecord) -> None:
        job.move_to("queued")
        job.datasets = ["ab" * 32]
    return store.update_job(job_id, change)


def test_lookups_by_id_prefix_and_name_and_state(store):
    old = _add(store, "guard", created_at="2026-01-01T00:00:00+00:00")
    new = _add(store, "guard", created_at="2026-01-02T00:00:00+00:00")
    other = _add(store, "other", created_at="2026-01-03T00:00:00+00:00")
    assert store.job(old.id) == old and store.job("nope") is None
    assert store.find_job("guard").id == new.id, "a name means its newest job"
    assert store.find_job(other.id[:-3]).id == other.id
    assert [j.id for j in store.all_jobs()] == [old.id, new.id, other.id]
    _queue(store, other.id)
    _queue(store, old.id)
    assert [j.id for j in store.queued_jobs()] == [old.id, other.id], "oldest first"
    assert store.has_queued_jobs()
    assert [j.id for j in store.jobs_in("waiting", "running")] == [new.id]
    assert store.job_for_datasets(["guard.jsonl"]).name == "guard" and store.job_for_datasets(["x"]) is None


def test_a_job_runs_its_stages_to_success_through_the_steps(store, tmp_path):
    job = _add(store, "guard", stages=["prepare", "train"])
    _queue(store, job.id)
    started = store.stage_started(job.id, 0, pid=4242, device="cpu")
    assert (started.state, started.stage, started.pid, started.attempts) == ("running", "prepare", 4242, 1)
    assert started.stages[0].state == "running" and started.stages[0].started_at
    after_first = store.stage_ended(job.id, 0, "succeeded", summary={"rows": 10}, artifacts={"splits": "/s"},
                                    message="ok")
    assert after_first.state == "queued" and after_first.pid is None, "the next stage waits for a slot"
    assert after_first.stages[0].summary == {"rows": 10} and after_first.first_unfinished() == 1
    store.stage_started(job.id, 1, pid=4243, device="cpu")
    last = store.stage_ended(job.id, 1, "skipped", message="nothing to do")
    assert last.state == "running" and last.first_unfinished() is None, "the job's end is finish_job's to say"
    store.set_job_fields(job.id, progress={"step": 3})
    done = store.finish_job(job.id, "succeeded")
    assert done.state == "succeeded" and done.progress is None
    reread = Store.for_home(tmp_path, readonly=True).job(job.id)
    assert reread == done and [s.state for s in reread.stages] == ["succeeded", "skipped"]


def test_failure_retry_and_cancel(store):
    job = _add(store, "guard", stages=["prepare", "train"])
    _queue(store, job.id)
    store.stage_started(job.id, 0, pid=1, device="cpu")
    store.stage_ended(job.id, 0, "succeeded")
    store.stage_started(job.id, 1, pid=2, device="cpu")
    store.stage_ended(job.id, 1, "failed", error="CUDA out of memory", exit_code=1)
    failed = store.finish_job(job.id, "failed", "train: CUDA out of memory")
    assert failed.state == "failed" and failed.stages[1].exit_code == 1
    with pytest.raises(IllegalTransition, match="cannot go from failed to running"):
        store.stage_started(job.id, 1, pid=3, device="cpu")
    assert store.job(job.id) == failed, "a refused change is not saved"

    retried = store.retry(job.id)
    assert retried.state == "queued" and retried.error is None
    assert [(s.state, s.error) for s in retried.stages] == [("succeeded", None), ("pending", None)]
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and [s.state for s in cancelled.stages] == ["succeeded", "cancelled"]
    with pytest.raises(IllegalTransition, match="cannot go from cancelled to cancelled"):
        store.cancel(job.id)


def test_requeue_after_a_dead_daemon_and_a_self_stop_wait(store):
    job = _add(store, "guard", stages=["prepare"])
    _queue(store, job.id)
    store.stage_started(job.id, 0, pid=1, device="cpu")
    requeued = store.requeue(job.id)  # the daemon died while the stage ran
    assert requeued.state == "queued" and requeued.stages[0].state == "pending" and requeued.pid is None

    store.stage_started(job.id, 0, pid=2, device="cpu")
    store.stage_ended(job.id, 0, "interrupted")
    store.finish_job(job.id, "interrupted", "stage prepare stopped itself")
    store.set_job_fields(job.id, resume_at=time.time() + 60)
    assert store.interrupted_jobs_due(time.time()) == []
    assert [j.id for j in store.interrupted_jobs_due(time.time() + 61)] == [job.id]
    resumed = store.requeue(job.id)
    assert resumed.state == "queued" and resumed.resume_at is None and resumed.stages[0].state == "pending"


def test_datasets_claims_and_model_versions(store):
    store.insert_dataset({"sha256": "ab" * 32, "name": "a.jsonl", "claim": "c1", "path": "datasets/a.jsonl",
                          "ingested_at": "2026-01-01T00:00:00+00:00", "default_job_due": 100.0})
    store.add_dataset_name("ab" * 32, "copy.jsonl")
    store.add_dataset_name("ab" * 32, "copy.jsonl")
    assert store.dataset("ab" * 32)["also_named"] == ["copy.jsonl"] and store.dataset_count() == 1
    assert store.default_jobs_due() and store.datasets_due(99.0) == [] and len(store.datasets_due(100.0)) == 1
    store.clear_default_job("ab" * 32)
    assert not store.default_jobs_due()

    assert store.claimed_record("c1")[0]["name"] == "a.jsonl", "recorded: only its move is left"
    assert store.count_recover_attempt("c1") == 0
    assert [store.count_recover_attempt("c9") for _ in range(3)] == [1, 2, 3]
    assert store.claim_attempts() == {"c9": 3}
    store.forget_claim("c9")
    assert store.claim_attempts() == {}
    job = _add(store, "guard")
    assert store.claimed_record("claim-guard") == (None, job)

    first = store.add_model({"name": "guard", "job_id": "j1", "metrics": {}})
    assert store.add_model({"name": "guard", "job_id": "j1"}) == first, "one entry per job"
    second = store.add_model({"name": "guard", "job_id": "j2", "metrics": {}})
    assert (first["version"], second["version"]) == (1, 2)
    store.update_model("j2", lambda e: {**e, "metrics": {"accuracy": 0.9}})
    assert store.model_of_job("j2")["metrics"] == {"accuracy": 0.9}
    assert [e["version"] for e in store.models_named("guard")] == [1, 2]
    assert store.events_of_kind("x") == [] and store.add_event("x", "m")["kind"] == "x"
    assert [e["message"] for e in store.events_of_kind("x")] == ["m"]


def test_a_read_only_store_refuses_to_write(store, tmp_path):
    job = _add(store, "guard")
    reader = Store.for_home(tmp_path, readonly=True)
    with pytest.raises(PermissionError, match="read-only"):
        reader.cancel(job.id)
    assert store.job(job.id).state == "waiting"
