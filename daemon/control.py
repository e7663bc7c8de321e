"""Cancel / retry requests. With a daemon running they go through files it consumes (it is the only
store writer); without one, the command takes the home lock and applies the change itself."""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from daemon.jobs import ACTIVE_STATES, JobRecord
from daemon.layout import Layout
from daemon.store import Store
from trainbox.fsio import write_json_atomically

log = logging.getLogger(__name__)


class RequestRefused(Exception):
    """The request does not apply to the job in its current state; the message says why."""


def write_request(home: Path, action: str, job_id: str) -> Path:
    path = Layout(home).control / f"{uuid.uuid4().hex}.json"
    write_json_atomically(path, {"action": action, "job": job_id})
    return path


def pending_requests(home: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(Layout(home).control.glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except json.JSONDecodeError:
            log.warning("ignoring unreadable control file %s", path)
            path.rename(path.with_suffix(".bad"))
    return out


def check_request(store: Store, action: str, job_id: str) -> JobRecord:
    """Validate a request against the job's state; return the job or raise RequestRefused."""
    job = store.job(job_id)
    if job is None:
        raise RequestRefused(f"no job {job_id}")
    if action == "cancel" and job.state not in ACTIVE_STATES:
        raise RequestRefused(f"job {job_id} is {job.state}; only waiting, queued, running or interrupted "
                             "jobs can be cancelled")
    if action == "retry" and job.trial is not None:
        raise RequestRefused(f"job {job_id} is trial {job.trial.number} of sweep {job.parent}; retry the sweep "
                             f"instead ('trainbox retry {job.parent}'): it continues its trials")
    if action == "retry" and job.state not in ("failed", "cancelled", "interrupted"):
        raise RequestRefused(f"job {job_id} is {job.state}; only failed, cancelled or interrupted jobs "
                             "can be retried")
    return job


def retry_job(store: Store, job_id: str) -> JobRecord:
    """Queue a failed/cancelled/interrupted job again from its first unfinished stage (checkpoints kept)."""
    return store.retry(job_id)


def cancel_idle_job(store: Store, job_id: str) -> JobRecord:
    """Cancel a job that has no running child (waiting, queued, interrupted)."""
    return store.cancel(job_id)
