"""What a stage receives (``StageContext``) and returns (``StageResult``).

The daemon writes ``stage.json`` into the stage directory; the child process builds the context from it.
A stage reads its inputs through the context and writes only inside ``ctx.stage_dir``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlers.diskspace import best_effort
from trainbox.fsio import append_line_durably, read_json, write_json_atomically
from trainbox.jobspec import JobSpec

STAGE_FILE = "stage.json"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "stage.log"
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 75


@dataclass
class DatasetRef:
    name: str
    sha256: str
    path: Path
    format: str
    rows: int


@dataclass
class StageResult:
    """What a stage hands back: small numbers for the store, paths (relative to the stage dir) of its files."""

    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    message: str = ""
    skipped: bool = False
    model: dict[str, Any] | None = None  # registry entry fields, when the stage produced a model version

    def to_dict(self) -> dict[str, Any]:
        return {"state": "skipped" if self.skipped else "succeeded", "summary": self.summary,
                "artifacts": self.artifacts, "message": self.message, "model": self.model}


class StageContext:
    """Everything a stage needs; built from ``stage.json`` by ``load_context``."""

    def __init__(self, stage_dir: Path, spec: dict[str, Any], stop_event: threading.Event | None = None,
                 log: logging.Logger | None = None):
        self.stage_dir = Path(stage_dir)
        self.stage: str = spec["stage"]
        self.job_id: str = spec["job_id"]
        self.home = Path(spec["home"])
        self.job = JobSpec.model_validate(spec["job"])
        self.datasets = [DatasetRef(d["name"], d["sha256"], Path(d["path"]), d["format"], d["rows"])
                         for d in spec.get("datasets", [])]
        self.stage_dirs = {k: Path(v) for k, v in spec.get("stage_dirs", {}).items()}
        self.results: dict[str, dict[str, Any]] = spec.get("results", {})
        self.previous_model: dict[str, Any] | None = spec.get("previous_model")
        self.device: str = spec.get("device", "cpu")
        self.settings: dict[str, Any] = spec.get("settings", {})
        # {"name": job name, "version": N}: the registry version this job's model gets (evaluate/export)
        self.model: dict[str, Any] | None = spec.get("model")
        self.log = log or logging.getLogger(f"handlers.{self.stage}")
        self._stop = stop_event or threading.Event()
        self._last_progress = 0.0

    def should_stop(self) -> bool:
        """True once a stop signal arrived: finish the current step, save, then raise StopRequested."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def input_dir(self, stage: str) -> Path:
        """Directory of an earlier stage of this job (its outputs are this stage's inputs)."""
        return self.stage_dirs[stage]

    def input_artifact(self, stage: str, name: str) -> Path:
        """Absolute path of an artifact an earlier stage listed in its result."""
        rel = self.results.get(stage, {}).get("artifacts", {}).get(name)
        if rel is None:
            raise KeyError(f"stage {stage} recorded no artifact {name!r}")
        return self.stage_dirs[stage] / rel

    def report_progress(self, force: bool = False, **fields: Any) -> None:
        """Write ``progress.json`` (throttled to once a second unless forced; skipped while the disk is full)."""
        now = time.monotonic()
        if not force and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        record = {"stage": self.stage, "time": time.time(), **fields}
        best_effort("progress.json", lambda: write_json_atomically(self.stage_dir / PROGRESS_FILE, record))

    def emit_event(self, kind: str, message: str, **data: Any) -> None:
        """Pass an event (e.g. ``resource_warning``) to the daemon, which notifies the user (lost on a full disk)."""
        line = json.dumps({"time": time.time(), "kind": kind, "message": message, "stage": self.stage, **data},
                          default=str)
        best_effort("an event for the daemon", lambda: append_line_durably(self.stage_dir / EVENTS_FILE, line))


def load_context(stage_dir: Path, **kwargs: Any) -> StageContext:
    spec = read_json(Path(stage_dir) / STAGE_FILE)
    if spec is None:
        raise FileNotFoundError(f"{stage_dir}/{STAGE_FILE} is missing; stages are started by the daemon")
    return StageContext(stage_dir, spec, **kwargs)
