"""Daemon settings (``configs/daemon.yaml`` or ``<home>/daemon.yaml``), declared once and validated at start."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainbox.jobspec import JobSpec
from trainbox.untrusted import read_capped
from trainbox.yamlmodel import decode_utf8, parse_yaml_model

MAX_SETTINGS_BYTES = 64_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WatchSettings(Strict):
    rescan_seconds: float = Field(5.0, gt=0, description="Full inbox rescan (catches events the OS dropped).")
    stable_seconds: float = Field(1.0, gt=0, description="Size and mtime unchanged this long = file complete.")
    use_close_events: bool = Field(True, description="Treat an inotify close-after-write as complete at once.")


class ConcurrencySettings(Strict):
    jobs_per_gpu: int = Field(1, ge=1)
    cpu_jobs: int = Field(1, ge=0, description="Jobs run at once on the CPU (when no GPU is free or present).")


class SupervisorSettings(Strict):
    stop_grace_seconds: float = Field(120.0, gt=0, description="How long a stopped stage may take to checkpoint.")
    poll_seconds: float = Field(1.0, gt=0)
    log_tail_lines: int = Field(40, ge=1)
    self_stop_resume_seconds: float = Field(
        60.0, gt=0, description="A stage that stopped itself on a condition that clears (a full disk) is resumed "
                                "this long after.")


class DefaultJobSettings(Strict):
    enabled: bool = True
    delay_seconds: float = Field(5.0, ge=0, description="Wait this long for a job YAML naming the dataset.")
    job: dict = Field(default_factory=lambda: {"base_model": "builtin:tiny"},
                      description="Job keys applied to a dataset dropped without a job (name/datasets are filled in).",
                      json_schema_extra={"keys_of": "JobSpec"})

    @field_validator("job")
    @classmethod
    def _valid_job(cls, job: dict) -> dict:
        # validated with the settings, so a typo is reported when daemon.yaml loads (and by doctor), never
        # when the first bare dataset comes due; errors keep their key path (default_job.job.train....)
        JobSpec.model_validate({**job, "name": "default", "datasets": ["dataset.jsonl"]})
        return job

    def spec_for(self, dataset: str, job_name: str) -> JobSpec:
        return JobSpec.model_validate({**self.job, "name": job_name, "datasets": [dataset]})


class LimitSettings(Strict):
    max_dataset_mb: float = Field(1024.0, gt=0, description="A larger dropped dataset is rejected unread.")


class ResourceSettings(Strict):
    check_seconds: float = Field(30.0, gt=0)
    gpu_temp_c: float = 75.0
    ram_percent: float = 95.0
    cpu_percent: float = 90.0
    cpu_sustained_seconds: float = 120.0
    min_free_disk_gb: float = 5.0


class NotifyBackendSettings(Strict):
    desktop: bool = True
    audio: bool = False
    speak: bool = False
    webhook_url: str | None = None
    webhook_format: Literal["json", "ntfy", "slack"] = "json"
    audio_device: str | None = Field(None, description="Sound device for paplay (sink) or aplay (ALSA device).")
    timeout_seconds: float = Field(5.0, gt=0)


class NotifySettings(Strict):
    backends: NotifyBackendSettings = NotifyBackendSettings()
    events: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "job_succeeded": ["desktop", "audio", "webhook"],
            "job_failed": ["desktop", "audio", "webhook"],
            "job_interrupted": ["desktop"],
            "job_waiting_too_long": ["desktop"],
            "file_rejected": ["desktop"],
            "resource_warning": ["desktop", "webhook"],
            "model_exported": ["desktop", "audio", "webhook"],
        },
        description="Event name -> backends that receive it.",
    )
    rate_limit_per_minute: int = Field(6, ge=1)
    coalesce_seconds: float = Field(2.0, ge=0, description="Same-event notifications this close become one.")
    waiting_too_long_seconds: float = Field(3600.0, gt=0)


class DaemonSettings(Strict):
    watch: WatchSettings = WatchSettings()
    concurrency: ConcurrencySettings = ConcurrencySettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    default_job: DefaultJobSettings = DefaultJobSettings()
    resources: ResourceSettings = ResourceSettings()
    notify: NotifySettings = NotifySettings()
    limits: LimitSettings = LimitSettings()


def resolve_home(cli_home: str | None) -> Path:
    """``--home``, else ``TRAINBOX_HOME``, else the current directory."""
    return Path(cli_home or os.environ.get("TRAINBOX_HOME") or os.getcwd()).resolve()


def load_settings(home: Path) -> DaemonSettings:
    """``<home>/daemon.yaml`` if present, else ``<home>/configs/daemon.yaml``, else defaults."""
    for candidate in (home / "daemon.yaml", home / "configs" / "daemon.yaml"):
        if candidate.exists():
            return _parse(candidate)
    return DaemonSettings()


def _parse(path: Path) -> DaemonSettings:
    # a link is fine here (people link their config), but the size is capped like every input
    data = read_capped(path, MAX_SETTINGS_BYTES, str(path), "settings file", follow_links=True)
    return parse_yaml_model(decode_utf8(str(path), data), str(path), DaemonSettings,
                            examples="the commented configs/daemon.yaml")
