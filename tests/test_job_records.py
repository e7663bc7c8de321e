"""daemon.jobs: typed job and stage records; every state change goes through the transition tables."""
from __future__ import annotations

import pytest

from daemon.jobs import (JOB_STATES, JOB_TRANSITIONS, STAGE_STATES, STAGE_TRANSITIONS, IllegalTransition, JobRecord,
                         StageRecord, job_view, new_job)
from trainbox.jobspec import JobSpec


def _job(state: str = "waiting") -> JobRecord:
    job = new_job(JobSpec(name="guard", datasets=["guard.jsonl"]), source="test", claim=None)
    return job.model_copy(update={"state": state})


def test_the_tables_cover_every_state_and_name_only_states():
    assert set(JOB_TRANSITIONS) == set(JOB_STATES)
    assert set(STAGE_TRANSITIONS) == set(STAGE_STATES)
    assert all(targets <= set(JOB_STATES) for targets in JOB_TRANSITIONS.values())
    assert all(targets <= set(STAGE_STATES) for targets in STAGE_TRANSITIONS.values())
    assert JOB_TRANSITIONS["succeeded"] == frozenset() and STAGE_TRANSITIONS["succeeded"] == frozenset()


@pytest.mark.parametrize("current", JOB_STATES)
def test_every_job_transition_is_allowed_or_raises_naming_both_states(current):
    for target in JOB_STATES:
        job = _job(current)
        if target in JOB_TRANSITIONS[current]:
            job.move_to(target)
            assert job.state == target
            continue
        with pytest.raises(IllegalTransition) as raised:
            job.move_to(target)
        assert f"job {job.id} cannot go from {current} to {target}" in str(raised.value)
        assert (raised.value.current, raised.value.target) == (current, target)
        assert job.state == current, "a refused move changes nothing"


@pytest.mark.parametrize("current", STAGE_STATES)
def test_every_stage_transition_is_allowed_or_raises_naming_both_states(current):
    for target in STAGE_STATES:
        stage = StageRecord(name="train", state=current)
        if target in STAGE_TRANSITIONS[current]:
            stage.move_to(target)
            assert stage.state == target
            continue
        with pytest.raises(IllegalTransition, match=f"stage train cannot go from {current} to {target}"):
            stage.move_to(target)
        assert stage.state == current


def test_the_state_is_never_assigned_around_the_table():
    job = _job()
    with pytest.raises(AttributeError, match="move_to"):
        job.state = "succeeded"
    with pytest.raises(AttributeError, match="move_to"):
        job.stages[0].state = "succeeded"
    assert job.state == "waiting" and job.stages[0].state == "pending"


def test_a_record_round_trips_through_the_stored_json_with_its_spec_typed():
    job = _job("queued")
    job.stages[0].move_to("running")
    job.stages[0].move_to("succeeded")
    job.stages[0].summary = {"rows": {"train": 8}}
    doc = job.to_doc()
    assert doc["spec"] == JobSpec(name="guard", datasets=["guard.jsonl"]).model_dump(mode="json")
    again = JobRecord.from_doc(doc)
    assert again == job and isinstance(again.spec, JobSpec) and again.first_unfinished() == 1
    assert job_view(again)["stages"][0]["state"] == "succeeded"
    assert job_view(again)["dataset_patterns"] == ["guard.jsonl"]


def test_a_job_written_before_records_were_typed_still_loads():
    """The store's on-disk shape of an older trainbox: no resume_at / waiting_notified, an unknown extra key."""
    doc = {"id": "20260101-000000-old-abcd", "name": "old", "state": "failed", "stage": "train",
           "stages": [{"name": "prepare", "state": "succeeded", "started_at": None, "ended_at": None,
                       "summary": {}, "artifacts": {}, "message": "", "error": None, "exit_code": None},
                      {"name": "train", "state": "failed", "started_at": None, "ended_at": None, "summary": {},
                       "artifacts": {}, "message": "", "error": "boom", "exit_code": 1}],
           "progress": None, "error": "boom", "created_at": "2026-01-01T00:00:00+00:00",
           "updated_at": "2026-01-01T00:00:00+00:00", "spec": {"name": "old", "datasets": ["d"]},
           "datasets": ["ab" * 32], "source": "inbox/old.yaml", "claim": "c1", "attempts": 1, "pid": None,
           "device": "cpu", "model": None, "kept": "by a newer trainbox"}
    job = JobRecord.from_doc(doc)
    assert job.spec.name == "old" and job.resume_at is None and job.waiting_notified is False
    assert job.to_doc()["kept"] == "by a newer trainbox"
    job.reset_stages_from(job.first_unfinished())
    job.move_to("queued")
    assert [s.state for s in job.stages] == ["succeeded", "pending"] and job.stages[1].error is None
