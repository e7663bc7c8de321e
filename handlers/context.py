"""What a stage receives (``StageContext``, built from the daemon's ``StageSpec``) and returns (``StageResult``).

The daemon writes ``stage.json`` into the stage directory; the child process builds the context from it.
A stage reads its inputs through the context and writes only inside ``ctx.stage_dir``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

from handlers.diskspace import best_effort
from trainbox.fsio import append_line_durably, write_json_atomically
from trainbox.protocol import EVENTS_FILE, PROGRESS_FILE, STAGE_FILE, DatasetEntry, StageSpec, StageSummary

SummaryT = TypeVar("SummaryT", bound=StageSummary)


class StageContext:
    """Everything a stage needs; built from ``stage.json`` by ``load_context``."""

    def __init__(self, stage_dir: Path, spec: StageSpec, stop_event: threading.Event | None = None,
                 log: logging.Logger | None = None):
        self.stage_dir = Path(stage_dir)
        self.stage = spec.stage
        self.job_id = spec.job_id
        self.home = spec.home
        self.job = spec.job
        self.datasets: list[DatasetEntry] = spec.datasets
        self.stage_dirs = spec.stage_dirs
        self.results = spec.results
        self.previous_model = spec.previous_model
        self.device = spec.device
        self.settings = spec.settings
        self.trial = spec.trial  # the sweep trial this job runs as (pruning), or None
        self.model = spec.model  # {"name": job name, "version": N}: the registry version (evaluate/export)
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

    def summary_of(self, stage: str, model: type[SummaryT]) -> SummaryT | None:
        """The ``summary`` an earlier stage of this job handed back, typed; None when it has not run."""
        result = self.results.get(stage)
        return None if result is None else model.model_validate(result.get("summary") or {})

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
        best_effort(PROGRESS_FILE, lambda: write_json_atomically(self.stage_dir / PROGRESS_FILE, record))

    def emit_event(self, kind: str, message: str, **data: Any) -> None:
        """Pass an event (e.g. ``resource_warning``) to the daemon, which notifies the user (lost on a full disk)."""
        line = json.dumps({"time": time.time(), "kind": kind, "message": message, "stage": self.stage, **data},
                          default=str)
        best_effort("an event for the daemon", lambda: append_line_durably(self.stage_dir / EVENTS_FILE, line))


def load_context(stage_dir: Path, **kwargs: Any) -> StageContext:
    path = Path(stage_dir) / STAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; stages are started by the daemon")
    return StageContext(stage_dir, StageSpec.model_validate_json(path.read_bytes()), **kwargs)
