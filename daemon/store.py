"""The job store: one TinyDB file written atomically, by the daemon alone, behind a repository API.

A power cut leaves the old or the new file, never a torn one (temp file, fsync, rename, fsync dir).
Other processes (CLI, status view) open it read-only. No other module touches TinyDB tables or queries.

The API in ten lines (jobs are ``daemon.jobs.JobRecord``; datasets, model entries and events are dicts):
- jobs: ``job(id)``, ``find_job(ref)``, ``all_jobs()``, ``jobs_in(*states)`` (oldest first),
  ``queued_jobs()``, ``interrupted_jobs_due(now)``, ``job_for_datasets(shas)``, ``insert_job(record)``,
  ``update_job(id, change)`` (``change(record)`` mutates it under the lock; the saved record is returned),
  ``set_job_fields(id, **fields)`` for plain fields.
- stage steps: ``stage_started(id, index, pid=, device=)``, ``stage_ended(id, index, state, ...)``,
  ``requeue(id)``, ``finish_job(id, state, error)``, ``retry(id)``, ``cancel(id)``; every state change
  goes through ``move_to`` and its transition table.
- datasets: ``dataset(sha)``, ``all_datasets()``, ``dataset_count()``, ``insert_dataset(doc)``,
  ``add_dataset_name(sha, name)``, ``clear_default_job(sha)``, ``datasets_due(now)``, ``default_jobs_due()``.
- ingest claims: ``claimed_record(claim)``, ``count_recover_attempt(claim)``, ``forget_claim(claim)``.
- model registry: ``model_of_job(id)``, ``models_named(name)``, ``all_models()``, ``add_model(entry)``
  (next version under the lock), ``update_model(job_id, change)``; events, meta as before.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from tinydb import Query, TinyDB
from tinydb.storages import Storage

from daemon.jobs import JobRecord, utcnow
from trainbox.fsio import write_text_atomically

log = logging.getLogger(__name__)
_Q = Query()
__all__ = ["AtomicJSONStorage", "Store", "pid_alive", "utcnow"]


class AtomicJSONStorage(Storage):
    """TinyDB storage whose every write is a durable atomic replace of the whole file."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly

    def read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return json.loads(text) if text.strip() else None

    def write(self, data: dict[str, Any]) -> None:
        if self.readonly:
            raise PermissionError(f"{self.path} is opened read-only: only the daemon writes the store")
        write_text_atomically(self.path, json.dumps(data, sort_keys=True, default=str))

    def close(self) -> None:
        pass


class Store:
    """Tables: ``jobs``, ``datasets``, ``claims`` (inbox files being ingested after a crash), ``models``,
    ``events``, ``meta``. Every method that writes takes the lock (the daemon's threads share one writer)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = TinyDB(str(self.path), storage=AtomicJSONStorage, readonly=readonly)
        self.lock = threading.RLock()
        self._jobs = self._db.table("jobs")
        self._datasets = self._db.table("datasets")
        self._claims = self._db.table("claims")
        self._models = self._db.table("models")
        self._events = self._db.table("events")
        self._meta = self._db.table("meta")

    @classmethod
    def for_home(cls, home: Path, readonly: bool = False) -> "Store":
        return cls(Path(home) / "state" / "trainbox.json", readonly=readonly)

    # jobs -----------------------------------------------------------------
    def job(self, job_id: str) -> JobRecord | None:
        doc = self._jobs.get(_Q.id == job_id)
        return JobRecord.from_doc(doc) if doc is not None else None

    def find_job(self, ref: str) -> JobRecord | None:
        """A job by full id, unique id prefix, or name (newest job of that name)."""
        exact = self.job(ref)
        if exact:
            return exact
        docs = self._jobs.all()
        matches = [j for j in docs if j["id"].startswith(ref)] or [j for j in docs if j["name"] == ref]
        return JobRecord.from_doc(max(matches, key=lambda j: j["created_at"])) if matches else None

    def all_jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        return self._records(self._jobs.all())

    def jobs_in(self, *states: str) -> list[JobRecord]:
        """Jobs in any of ``states``, oldest first."""
        return self._records(self._jobs.search(_Q.state.one_of(list(states))))

    def queued_jobs(self) -> list[JobRecord]:
        return self.jobs_in("queued")

    def has_queued_jobs(self) -> bool:
        return self._jobs.contains(_Q.state == "queued")

    def interrupted_jobs_due(self, now: float) -> list[JobRecord]:
        """Interrupted jobs whose stage stopped itself and whose wait before resuming is over."""
        return self._records(self._jobs.search((_Q.state == "interrupted") & _Q.resume_at.test(
            lambda t: t is not None and t <= now)))

    def trials_of(self, sweep_id: str) -> list[JobRecord]:
        """The trial jobs of a sweep, by trial number."""
        return sorted(self._records(self._jobs.search(_Q.parent == sweep_id)), key=lambda j: j.trial.number)

    def job_for_datasets(self, patterns: list[str]) -> JobRecord | None:
        """A job whose spec names exactly these dataset patterns (a default job already made)."""
        doc = self._jobs.get(_Q.spec.datasets == list(patterns))
        return JobRecord.from_doc(doc) if doc is not None else None

    def insert_job(self, job: JobRecord) -> None:
        with self.lock:
            self._jobs.insert(job.to_doc())

    def update_job(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        """Load the job, let ``change`` mutate it, stamp ``updated_at`` and save; return the saved record."""
        with self.lock:
            job = self.job(job_id)
            if job is None:
                raise KeyError(job_id)
            change(job)
            job.updated_at = utcnow()
            self._jobs.update(job.to_doc(), _Q.id == job_id)
            return job

    def set_job_fields(self, job_id: str, **fields: Any) -> JobRecord:
        """Set plain fields of a job (progress, error, resume_at ...); its state only changes by ``move_to``."""
        def change(job: JobRecord) -> None:
            for key, value in fields.items():
                setattr(job, key, value)
        return self.update_job(job_id, change)

    @staticmethod
    def _records(docs: list[dict]) -> list[JobRecord]:
        return [JobRecord.from_doc(d) for d in sorted(docs, key=lambda j: (j["created_at"], j["id"]))]

    # the steps of a job's life ------------------------------------------------
    def stage_started(self, job_id: str, index: int, *, pid: int, device: str) -> JobRecord:
        """Stage ``index`` is running in process ``pid`` on ``device``; the job is running."""
        def change(job: JobRecord) -> None:
            stage = job.stages[index]
            stage.move_to("running")
            stage.started_at, stage.ended_at, stage.error = utcnow(), None, None
            job.move_to("running")
            job.stage, job.pid, job.device, job.error = stage.name, pid, device, None
            job.attempts += 1
        return self.update_job(job_id, change)

    def stage_ended(self, job_id: str, index: int, state: str, *, error: str | None = None,
                    exit_code: int | None = None, summary: dict[str, Any] | None = None,
                    artifacts: dict[str, str] | None = None, message: str = "") -> JobRecord:
        """Stage ``index`` ended in ``state``; a finished stage queues the job for its next stage (the job's
        own end state is set by ``finish_job``)."""
        def change(job: JobRecord) -> None:
            stage = job.stages[index]
            stage.move_to(state)
            stage.ended_at, stage.error, stage.exit_code = utcnow(), error, exit_code
            if stage.finished:
                stage.summary, stage.artifacts, stage.message = summary or {}, artifacts or {}, message
                if job.first_unfinished() is not None:
                    job.move_to("queued")  # the next stage starts on the next tick, in any free slot
            job.pid = None
        return self.update_job(job_id, change)

    def finish_job(self, job_id: str, state: str, error: str | None = None) -> JobRecord:
        """The job ended (for now) in ``state``: succeeded, failed, interrupted or cancelled."""
        def change(job: JobRecord) -> None:
            job.move_to(state)
            job.error, job.pid = error, None
            if state == "succeeded":
                job.progress = None
        return self.update_job(job_id, change)

    def requeue(self, job_id: str) -> JobRecord:
        """Queue a running or interrupted job again; its running or interrupted stage runs again."""
        def change(job: JobRecord) -> None:
            for stage in job.stages:
                if stage.state in ("running", "interrupted"):
                    stage.move_to("pending")
                    stage.ended_at = None
            job.move_to("queued")
            job.pid, job.resume_at = None, None
        return self.update_job(job_id, change)

    def retry(self, job_id: str) -> JobRecord:
        """Queue a failed/cancelled/interrupted job again from its first unfinished stage (checkpoints kept)."""
        def change(job: JobRecord) -> None:
            first = job.first_unfinished()
            job.reset_stages_from(len(job.stages) if first is None else first)
            job.move_to("queued" if job.datasets else "waiting")
            job.error, job.pid, job.progress, job.resume_at = None, None, None, None
        return self.update_job(job_id, change)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job that has no running child (waiting, queued, interrupted, or left running by a dead
        daemon): its unfinished stages are cancelled with it."""
        def change(job: JobRecord) -> None:
            for stage in job.stages:
                if stage.state in ("pending", "running", "interrupted"):
                    stage.move_to("cancelled")
            job.move_to("cancelled")
            job.pid = None
        return self.update_job(job_id, change)

    # datasets -------------------------------------------------------------
    def dataset(self, sha256: str) -> dict | None:
        return self._datasets.get(_Q.sha256 == sha256)

    def all_datasets(self) -> list[dict]:
        return sorted(self._datasets.all(), key=lambda d: d["ingested_at"])

    def dataset_count(self) -> int:
        return len(self._datasets)

    def insert_dataset(self, doc: dict) -> None:
        with self.lock:
            self._datasets.insert(doc)

    def add_dataset_name(self, sha256: str, name: str) -> None:
        """Another file name the same content was dropped under (jobs naming it mean the stored copy)."""
        with self.lock:
            doc = self.dataset(sha256)
            if doc is not None and name != doc["name"] and name not in doc.get("also_named", []):
                self._datasets.update({"also_named": [*doc.get("also_named", []), name]}, _Q.sha256 == sha256)

    def clear_default_job(self, sha256: str) -> None:
        """This dataset gets no default job (one was made, or a job claimed it)."""
        with self.lock:
            self._datasets.update({"default_job_due": None}, _Q.sha256 == sha256)

    def datasets_due(self, now: float) -> list[dict]:
        """Datasets whose default job is due at ``now``."""
        return self._datasets.search((_Q.default_job_due != None) & (_Q.default_job_due <= now))  # noqa: E711

    def default_jobs_due(self) -> bool:
        """Whether any dataset still waits for its default job (due now or later)."""
        return self._datasets.contains(_Q.default_job_due != None)  # noqa: E711

    # ingest claims --------------------------------------------------------
    def claimed_record(self, claim_id: str) -> tuple[dict | None, JobRecord | None]:
        """The dataset or the job recorded from inbox claim ``claim_id`` (both None: not recorded yet)."""
        dataset = self._datasets.get(_Q.claim == claim_id)
        if dataset is not None:
            return dataset, None
        doc = self._jobs.get(_Q.claim == claim_id)
        return None, JobRecord.from_doc(doc) if doc is not None else None

    def count_recover_attempt(self, claim_id: str) -> int:
        """Count one more attempt at reading claim ``claim_id`` after a restart; 0 when it is recorded
        already (only its move is left, nothing is read again)."""
        with self.lock:
            if self.claimed_record(claim_id) != (None, None):
                return 0
            row = self._claims.get(_Q.claim == claim_id) or {"claim": claim_id, "attempts": 0}
            self._claims.upsert({**row, "attempts": row["attempts"] + 1}, _Q.claim == claim_id)
            return row["attempts"] + 1

    def forget_claim(self, claim_id: str) -> None:
        with self.lock:
            self._claims.remove(_Q.claim == claim_id)

    def claim_attempts(self) -> dict[str, int]:
        """Recover attempts counted per claim (claims whose reading a restart interrupted)."""
        return {row["claim"]: row["attempts"] for row in self._claims.all()}

    # model registry -------------------------------------------------------
    def model_of_job(self, job_id: str) -> dict | None:
        found = self._models.get(_Q.job_id == job_id)
        return dict(found) if found is not None else None

    def models_named(self, name: str) -> list[dict]:
        return [dict(e) for e in self._models.search(_Q.name == name)]

    def all_models(self) -> list[dict]:
        return sorted((dict(e) for e in self._models.all()), key=lambda e: (e["name"], e["version"]))

    def add_model(self, entry: dict) -> dict:
        """Insert ``entry`` as the next version of its name (or return the job's entry if it has one)."""
        with self.lock:
            existing = self.model_of_job(entry["job_id"])
            if existing is not None:
                return existing
            versions = [e["version"] for e in self._models.search(_Q.name == entry["name"])]
            entry = {"name": entry["name"], "version": max(versions, default=0) + 1, **entry}
            self._models.insert(entry)
            return entry

    def update_model(self, job_id: str, change: Callable[[dict], dict]) -> dict:
        """Replace the job's entry with ``change(entry)`` under the lock; return the saved entry."""
        with self.lock:
            entry = change(self.model_of_job(job_id) or {})
            self._models.update(entry, _Q.job_id == job_id)
            return entry

    # events ---------------------------------------------------------------
    def add_event(self, kind: str, message: str, **data: Any) -> dict:
        event = {"time": utcnow(), "kind": kind, "message": message, **data}
        with self.lock:
            self._events.insert(event)
            if len(self._events) > 1000:  # keep the store small: the log file has the full history
                oldest = sorted(self._events.all(), key=lambda e: e.doc_id)[: len(self._events) - 1000]
                self._events.remove(doc_ids=[e.doc_id for e in oldest])
        return event

    def recent_events(self, n: int = 20) -> list[dict]:
        return sorted(self._events.all(), key=lambda e: e.doc_id)[-n:]

    def events_of_kind(self, kind: str) -> list[dict]:
        """Stored events of ``kind``, oldest first."""
        return sorted(self._events.search(_Q.kind == kind), key=lambda e: e.doc_id)

    # daemon heartbeat -----------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.lock:
            self._meta.upsert({"key": key, "value": value}, _Q.key == key)

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._meta.get(_Q.key == key)
        return row["value"] if row else default


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
