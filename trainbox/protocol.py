"""The stage protocol: the files a stage directory holds, the exit codes, and the typed ``stage.json``
(``StageSpec``, written by the daemon) and ``result.json`` (``StageResult``, written by the stage).

Both sides build and read these files only through these models; field names and values are what users'
scripts read, so they change only with ``PROTOCOL_VERSION``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trainbox.fsio import write_json_atomically
from trainbox.jobspec import JobSpec

STAGE_FILE = "stage.json"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "stage.log"
RANK_EXIT_FILE = "rank_exit.json"  # distributed runs: the exit code of each machine's first rank
# one set for the CLI and the stage processes: 2 is usage or bad input, 75 (EX_TEMPFAIL) interrupted and resumable
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 75
PROTOCOL_VERSION = 1


class DatasetEntry(BaseModel):
    """An accepted dataset as a stage sees it (``path`` absolute)."""

    name: str
    sha256: str
    path: Path
    format: str
    rows: int


class TrialRef(BaseModel):
    """The Optuna trial a sweep's trial job runs as: its train stage reports intermediate values to it."""

    storage: str
    study: str
    trial_id: int
    number: int
    direction: Literal["minimize", "maximize"]
    pruner: str
    trials: int


class StageSpec(BaseModel):
    """``stage.json``: everything the daemon tells a stage it starts."""

    model_config = ConfigDict(extra="forbid")

    version: int = PROTOCOL_VERSION
    job_id: str
    stage: str
    home: Path
    job: JobSpec
    datasets: list[DatasetEntry] = []
    results: dict[str, dict[str, Any]] = {}  # result.json of this job's finished stages, by stage name
    stage_dirs: dict[str, Path] = {}
    device: str = "cpu"
    settings: dict[str, Any] = {}
    model: dict[str, Any] | None = None  # {"name", "version"}: the registry version this job's model gets
    previous_model: dict[str, Any] | None = None  # the registry entry before it, for comparison
    trial: TrialRef | None = None  # set for the stages of a sweep's trial


class StageResult(BaseModel):
    """``result.json``: what a stage hands back: small numbers for the store, paths (relative to the stage
    dir) of its files, the registry fields of a model it produced, or why it failed.

    What the daemon does with it is declared here, never inferred from the stage's name: ``model`` (registry
    fields, no paths) makes the job's model a registry version; ``model_artifacts`` names which of
    ``artifacts`` the registry keeps for it (registry name -> artifact name); ``publish`` names the artifact,
    a folder, that becomes ``models/<name>/v<version>/`` (every artifact inside it moves along);
    ``skip_rest`` says why the job's later stages have nothing to do (a sweep trial its pruner stopped): they
    are skipped with that message.
    """

    version: int = PROTOCOL_VERSION
    state: Literal["succeeded", "skipped", "failed"] = "succeeded"
    summary: dict[str, Any] = {}
    artifacts: dict[str, str] = {}
    message: str = ""
    model: dict[str, Any] | None = None
    model_artifacts: dict[str, str] = {}
    publish: str | None = None
    skip_rest: str | None = None
    error: str | None = None

    @property
    def skipped(self) -> bool:
        return self.state == "skipped"


class StageSummary(BaseModel):
    """A finished stage's ``summary`` as a later stage reads it (``ctx.summary_of(stage, Model)``): the fields
    read across stages are declared and typed; every other key is kept as it was written."""

    model_config = ConfigDict(extra="allow")

    def as_dict(self) -> dict[str, Any]:
        """The summary as the stage wrote it (declared fields it did not write stay out)."""
        return self.model_dump(exclude_unset=True)


class PrepareSummary(StageSummary):
    format: str | None = None  # the most common row format
    rows: dict[str, int] = {}  # rows per split
    labels: dict[str, int] = {}  # classification labels and their counts, all splits together


class AugmentSummary(StageSummary):
    rows_original: int | None = None  # train rows before augmentation
    rows_generated: int | None = None  # generated rows added to them (val and test are never augmented)
    rows_total: int | None = None  # train rows after augmentation


class TrainSummary(StageSummary):
    base_model_path: str | None = None  # the local folder the base model was loaded from
    final_loss: float | None = None
    total_steps: int | None = None


class EvaluateSummary(StageSummary):
    winner: bool | None = None  # None: no verdict
    winner_reason: str | None = None
    accuracy: float | None = None


def write_record(path: Path, record: StageSpec | StageResult) -> None:
    """Write ``stage.json`` or ``result.json`` atomically, formatted as every trainbox JSON file."""
    write_json_atomically(path, record.model_dump(mode="json"))


def read_result(stage_dir: Path) -> StageResult:
    """The stage's ``result.json``; an empty success when the stage wrote none (an old or killed run)."""
    path = Path(stage_dir) / RESULT_FILE
    try:
        return StageResult.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return StageResult()
