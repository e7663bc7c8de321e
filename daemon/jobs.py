"""Job and stage records: typed, with explicit states and the transitions allowed between them.

The API in ten lines (the store, ``daemon/store.py``, loads and saves these records):
- ``JobRecord.new(spec, source=..., claim=...)``: a fresh job in state ``waiting``; ``record.spec`` stays a
  typed ``JobSpec`` (never a dict), ``record.stages`` is a list of ``StageRecord``.
- ``record.move_to(state)`` / ``stage.move_to(state)``: the only way to change a state; a move the tables
  ``JOB_TRANSITIONS`` / ``STAGE_TRANSITIONS`` do not list raises ``IllegalTransition`` naming from and to.
  Assigning ``.state`` directly raises too; a record may be *built* in any state (loading, test fixtures).
- ``record.first_unfinished()``: index of the first stage neither succeeded nor skipped (None: all done).
- ``record.stage_named(name)``, ``record.reset_stages_from(index)`` (retry), ``record.to_doc()`` (the
  on-disk JSON, the same shape the store always held), ``JobRecord.from_doc(doc)``.
- ``job_view(record)``: the documented ``--json`` shape; ``job_outcome(record)``: one line for the log.
"""
from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from trainbox.jobspec import JobSpec
from trainbox.protocol import TrialRef
from trainbox.study import shared_stages

JobState = Literal["waiting", "queued", "running", "interrupted", "succeeded", "failed", "cancelled"]
StageState = Literal["pending", "running", "interrupted", "succeeded", "skipped", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
STAGE_STATES: tuple[str, ...] = get_args(StageState)
ACTIVE_STATES = ("waiting", "queued", "running", "interrupted")
JSON_SCHEMA_VERSION = 1

# where each state may go next; anything else is a bug (or a request the state does not allow)
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "waiting": frozenset({"queued", "cancelled"}),
    # succeeded: a job requeued after its last stage had already finished (a daemon killed in between)
    "queued": frozenset({"running", "succeeded", "cancelled"}),
    "running": frozenset({"queued", "succeeded", "failed", "interrupted", "cancelled"}),
    # queued: resumed (restart, self-stop wait over, retry); waiting: retried before its datasets exist
    "interrupted": frozenset({"queued", "waiting", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued", "waiting"}),
    "cancelled": frozenset({"queued", "waiting"}),
}
STAGE_TRANSITIONS: dict[str, frozenset[str]] = {
    # skipped: a sweep trial was pruned, so its later stages have nothing to do
    "pending": frozenset({"running", "cancelled", "skipped"}),
    # pending: the daemon died while it ran, so it runs again (resuming from its checkpoint)
    "running": frozenset({"succeeded", "skipped", "failed", "interrupted", "cancelled", "pending"}),
    "interrupted": frozenset({"pending", "cancelled"}),
    "succeeded": frozenset(),
    "skipped": frozenset(),
    "failed": frozenset({"pending"}),
    "cancelled": frozenset({"pending"}),
}
FINISHED_STAGE_STATES = ("succeeded", "skipped")


class IllegalTransition(ValueError):
    """A state change the transition table does not allow; the message names the record, from and to."""

    def __init__(self, what: str, current: str, target: str, allowed: frozenset[str]):
        self.current, self.target = current, target
        options = ", ".join(sorted(allowed)) or "nothing (it is final)"
        super().__init__(f"{what} cannot go from {current} to {target} (from {current} it may go to {options})")


def utcnow(timestamp: float | None = None) -> str:
    """ISO 8601 UTC time (now, or of a ``time.time()`` value), as every record in the store uses."""
    moment = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="seconds")


def new_job_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{name[:40]}-{secrets.token_hex(2)}"


class _Stateful(BaseModel):
    """A record whose ``state`` changes only through ``move_to`` and its transition table."""

    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            raise AttributeError(f"set the state with move_to({value!r}), which checks the transition")
        super().__setattr__(name, value)

    def _describe(self) -> str:
        raise NotImplementedError

    def move_to(self, state: str) -> None:
        """Change the state; raise ``IllegalTransition`` unless the table allows ``current -> state``."""
        allowed = self.TRANSITIONS[self.state]  # type: ignore[attr-defined]
        if state not in allowed:
            raise IllegalTransition(self._describe(), self.state, state, allowed)  # type: ignore[attr-defined]
        super().__setattr__("state", state)


class StageRecord(_Stateful):
    """One stage of a job as the store keeps it: state, timings, and what its result said."""

    model_config = ConfigDict(extra="allow")
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = STAGE_TRANSITIONS

    name: str
    state: StageState = "pending"
    started_at: str | None = None
    ended_at: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)  # absolute paths, by the name the stage gave
    message: str = ""
    error: str | None = None
    exit_code: int | None = None

    def _describe(self) -> str:
        return f"stage {self.name}"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STAGE_STATES


class ModelRef(BaseModel):
    """The registry version a job's model gets (set when a stage first reports a model)."""

    name: str
    version: int


class TrialRecord(BaseModel):
    """What makes a job a sweep's trial: its Optuna trial, parameters, and how the study was told it ended."""

    number: int
    params: dict[str, Any]
    state: Literal["running", "complete", "pruned", "failed"] = "running"  # told to the study once it ended
    value: float | None = None
    note: str = ""  # "pruned at step N", or why it failed
    zoom_stage: int | None = None  # lr_zoom
    paused: bool = False  # cancelled with its sweep: it continues when the sweep is retried
    ref: TrialRef


class JobRecord(_Stateful):
    """A job as the store keeps it; ``extra="allow"`` keeps fields a newer trainbox wrote."""

    model_config = ConfigDict(extra="allow")
    TRANSITIONS: ClassVar[dict[str, frozenset[str]]] = JOB_TRANSITIONS

    id: str
    name: str
    state: JobState = "waiting"
    stage: str | None = None  # the stage running now, or the last one that ran
    stages: list[StageRecord]
    progress: dict[str, Any] | None = None
    error: str | None = None
    created_at: str
    updated_at: str
    spec: JobSpec
    datasets: list[str] = Field(default_factory=list)  # sha256 of the datasets the job resolved to
    source: str | None = None
    claim: str | None = None
    attempts: int = 0
    pid: int | None = None
    device: str | None = None
    model: ModelRef | None = None
    resume_at: float | None = None  # a stage that stopped itself resumes at this time.time()
    waiting_notified: bool = False
    parent: str | None = None  # a sweep's trial: the sweep's job id
    trial: TrialRecord | None = None
    shared: dict[str, str] = Field(default_factory=dict)  # stage name -> job whose stage folder this job reads
    sweep: str | None = None  # a sweep's train_best job: the sweep's job id
    sweep_started_at: float | None = None  # a sweep: when its trials began (timeout_minutes)

    @classmethod
    def new(cls, spec: JobSpec, *, source: str, claim: str | None) -> "JobRecord":
        """A fresh job in state ``waiting`` (the daemon resolves its datasets right after)."""
        now = utcnow()
        # a sweep's own record: the stages its trials share, then the sweep (trials, then the report)
        names = [*shared_stages(spec), "sweep"] if spec.kind == "sweep" else spec.stages
        return cls(id=new_job_id(spec.name), name=spec.name, stages=[StageRecord(name=s) for s in names],
                   created_at=now, updated_at=now, spec=spec, source=source, claim=claim)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "JobRecord":
        return cls.model_validate(dict(doc))

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def _describe(self) -> str:
        return f"job {self.id}"

    def first_unfinished(self) -> int | None:
        """Index of the first stage that has not succeeded or been skipped; None when all have."""
        return next((i for i, s in enumerate(self.stages) if not s.finished), None)

    def stage_named(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def reset_stages_from(self, index: int) -> None:
        """Make stage ``index`` and every later stage pending again, their results cleared (retry)."""
        for i in range(index, len(self.stages)):
            stage = self.stages[i]
            if stage.state != "pending":
                stage.move_to("pending")
            self.stages[i] = StageRecord(name=stage.name)


def new_job(spec: JobSpec, *, source: str, claim: str | None) -> JobRecord:
    """A fresh job record in state ``waiting`` (the daemon resolves its datasets right after)."""
    return JobRecord.new(spec, source=source, claim=claim)


def reset_stages_from(job: JobRecord, index: int) -> None:
    """Make stage ``index`` and every later stage pending again (retry)."""
    job.reset_stages_from(index)


def job_view(job: JobRecord) -> dict[str, Any]:
    """The documented ``--json`` shape of one job (schema version ``JSON_SCHEMA_VERSION``)."""
    return {
        "id": job.id,
        "name": job.name,
        "state": job.state,
        "stage": job.stage,
        "stages": [
            {"name": s.name, "state": s.state, "started_at": s.started_at, "ended_at": s.ended_at,
             "summary": s.summary, "artifacts": s.artifacts, "message": s.message, "error": s.error}
            for s in job.stages
        ],
        "progress": job.progress,
        "error": job.error,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "datasets": list(job.datasets),
        "dataset_patterns": list(job.spec.datasets),
        "base_model": job.spec.base_model,
        "source": job.source,
        "attempts": job.attempts,
        "device": job.device,
        "model": job.model.model_dump() if job.model else None,
        "parent": job.parent,
        "trial": job.trial.model_dump(include={"number", "params", "state", "value", "note"}) if job.trial else None,
        "sweep": job.sweep,
    }


def job_outcome(job: JobRecord) -> str:
    """One line saying what a finished job achieved, for the log and the notification."""
    parts = []
    for stage in job.stages:
        s = stage.summary
        if stage.name == "train" and s.get("final_loss") is not None:
            parts.append(f"train loss {s['final_loss']:.4f} after {s.get('total_steps')} steps")
        elif stage.name == "evaluate" and s.get("accuracy") is not None:
            line = f"held-out accuracy {s['accuracy']:.3f}, macro-F1 {s.get('macro_f1', 0):.3f}"
            if s.get("base_accuracy") is not None:
                line += f" (base model {s['base_accuracy']:.3f}, McNemar p={s.get('p_value', float('nan')):.3g})"
            parts.append(line)
        elif stage.name == "evaluate" and s.get("perplexity") is not None:
            parts.append(f"perplexity {s['perplexity']:.2f}")
        elif stage.name == "sweep" and s.get("best_trial") is not None:
            parts.append(f"best trial {s['best_trial']} ({s['objective']} {s['best_value']:.4f}) of "
                         f"{s['trials']} trials ({s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed)")
        elif stage.name == "export" and stage.state == "skipped":
            parts.append(f"export skipped: {stage.message}")
        elif stage.name == "export" and stage.artifacts.get("model_dir"):
            parts.append(f"model in {stage.artifacts['model_dir']}")
    return "; ".join(parts)
