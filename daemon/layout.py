"""The home directory layout (contract, see README 'Home layout')."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def rejected(self) -> Path:
        return self.home / "rejected"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def state(self) -> Path:
        return self.home / "state"

    @property
    def ingesting(self) -> Path:
        """Files claimed from the inbox and being validated (recovered after a crash)."""
        return self.home / "state" / "ingesting"

    @property
    def control(self) -> Path:
        """Requests from CLI commands (cancel, retry) that the running daemon consumes."""
        return self.home / "state" / "control"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def stage_dir(self, job_id: str, stage: str) -> Path:
        return self.jobs / job_id / stage

    def create(self) -> None:
        for d in (self.inbox, self.rejected, self.datasets, self.jobs, self.models, self.state,
                  self.ingesting, self.control, self.logs, self.cache):
            d.mkdir(parents=True, exist_ok=True)
