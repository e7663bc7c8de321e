"""The job store: one TinyDB file written atomically, by the daemon alone.

A power cut leaves the old or the new file, never a torn one (temp file, fsync, rename, fsync dir).
Other processes (CLI, status view) open it read-only.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tinydb import Query, TinyDB
from tinydb.storages import Storage

from trainbox.fsio import write_text_atomically

log = logging.getLogger(__name__)
Q = Query()


def utcnow(timestamp: float | None = None) -> str:
    """ISO 8601 UTC time (now, or of a ``time.time()`` value), as every record in the store uses."""
    moment = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="seconds")


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
    """Tables: ``jobs``, ``datasets``, ``claims`` (ingested inbox files), ``models``, ``events``, ``meta``."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = TinyDB(str(self.path), storage=AtomicJSONStorage, readonly=readonly)
        self.lock = threading.RLock()  # the daemon's threads share one writer
        self.jobs = self.db.table("jobs")
        self.datasets = self.db.table("datasets")
        self.claims = self.db.table("claims")
        self.models = self.db.table("models")
        self.events = self.db.table("events")
        self.meta = self.db.table("meta")

    @classmethod
    def for_home(cls, home: Path, readonly: bool = False) -> "Store":
        return cls(Path(home) / "state" / "trainbox.json", readonly=readonly)

    # jobs -----------------------------------------------------------------
    def job(self, job_id: str) -> dict | None:
        return self.jobs.get(Q.id == job_id)

    def find_job(self, ref: str) -> dict | None:
        """A job by full id, unique id prefix, or name (newest job of that name)."""
        exact = self.job(ref)
        if exact:
            return exact
        matches = [j for j in self.jobs.all() if j["id"].startswith(ref)] or \
                  [j for j in self.jobs.all() if j["name"] == ref]
        return max(matches, key=lambda j: j["created_at"]) if matches else None

    def all_jobs(self) -> list[dict]:
        return sorted(self.jobs.all(), key=lambda j: (j["created_at"], j["id"]))

    def insert_job(self, doc: dict) -> None:
        with self.lock:
            self.jobs.insert(doc)

    def update_job(self, job_id: str, change: dict | Callable[[dict], None]) -> dict:
        """Apply ``change`` (fields, or a function mutating the doc) and stamp ``updated_at``."""
        with self.lock:
            doc = self.job(job_id)
            if doc is None:
                raise KeyError(job_id)
            if callable(change):
                change(doc)
            else:
                doc.update(change)
            doc["updated_at"] = utcnow()
            self.jobs.update(doc, Q.id == job_id)
            return doc

    # datasets -------------------------------------------------------------
    def dataset(self, sha256: str) -> dict | None:
        return self.datasets.get(Q.sha256 == sha256)

    def all_datasets(self) -> list[dict]:
        return sorted(self.datasets.all(), key=lambda d: d["ingested_at"])

    # events ---------------------------------------------------------------
    def add_event(self, kind: str, message: str, **data: Any) -> dict:
        event = {"time": utcnow(), "kind": kind, "message": message, **data}
        with self.lock:
            self.events.insert(event)
            if len(self.events) > 1000:  # keep the store small: the log file has the full history
                oldest = sorted(self.events.all(), key=lambda e: e.doc_id)[: len(self.events) - 1000]
                self.events.remove(doc_ids=[e.doc_id for e in oldest])
        return event

    def recent_events(self, n: int = 20) -> list[dict]:
        return sorted(self.events.all(), key=lambda e: e.doc_id)[-n:]

    # daemon heartbeat -----------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.lock:
            self.meta.upsert({"key": key, "value": value}, Q.key == key)

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.meta.get(Q.key == key)
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
