"""What a stage's result and a job's end mean outside the stage directory: the model registry, the models/
folder, the event log and the user's notifications.

Driven by what a stage declares in its ``StageResult`` (``model``, ``model_artifacts``, ``publish``), never by
the stage's name, so a new stage that produces or publishes a model needs no change here. The supervisor
calls these from the daemon's main thread; it only starts, watches and stops stage processes.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from daemon import modelregistry
from daemon.config import DaemonSettings
from daemon.jobs import JobRecord, ModelRef, job_outcome, utcnow
from daemon.layout import Layout
from daemon.store import Store
from trainbox.fsio import move_durably, read_json, write_json_atomically
from trainbox.protocol import StageResult

log = logging.getLogger(__name__)
PUBLISHED_MARKER = ".trainbox-published.json"  # inside a published model folder: which job put it there


def publish_model_dir(src: Path, model_root: Path, version: int, job_id: str) -> Path:
    """Move ``src`` to ``model_root/v<version>``; idempotent per job: one folder per version.

    A folder already there that this job published (a daemon killed after the move, before the store said
    so) is replaced by the new export; only a folder another job or a person put there makes this one
    ``v<version>-<job id>``.
    """
    write_json_atomically(src / PUBLISHED_MARKER, {"job_id": job_id, "version": version, "published_at": utcnow()})
    for dest in (model_root / f"v{version}", model_root / f"v{version}-{job_id}"):
        owner = (read_json(dest / PUBLISHED_MARKER, {}) or {}).get("job_id") if dest.is_dir() else None
        if owner == job_id:
            log.info("%s was published by an earlier attempt of job %s; replacing it", dest, job_id)
            old = dest.with_name(f".replaced-{dest.name}")
            shutil.rmtree(old, ignore_errors=True)
            move_durably(dest, old)
        elif dest.exists() or dest.is_symlink():
            continue
        move_durably(src, dest)
        shutil.rmtree(dest.with_name(f".replaced-{dest.name}"), ignore_errors=True)
        return dest
    raise FileExistsError(f"{model_root}: v{version} and v{version}-{job_id} both belong to someone else; "
                          f"move them away and run 'trainbox retry {job_id}'")


class Outcomes:
    """Records what finished stages and jobs produced, and tells the user."""

    def __init__(self, layout: Layout, store: Store, settings: DaemonSettings, notify: Callable[..., None]):
        self.layout = layout
        self.store = store
        self.settings = settings
        self.notify = notify

    def stage_succeeded(self, job_id: str, stage: str, stage_dir: Path, result: StageResult) -> dict[str, str]:
        """Register the model the stage reports and publish the folder it names; return its artifacts as
        absolute paths (where they are after publishing), as the job record keeps them."""
        artifacts = {k: str(stage_dir / v) for k, v in result.artifacts.items()}
        if not result.model or self.store.job(job_id).trial is not None:  # a sweep's trials are not registered
            return artifacts
        entry = modelregistry.ensure_entry(self.store, self.store.job(job_id))
        model = ModelRef(name=entry["name"], version=entry["version"])
        job = self.store.set_job_fields(job_id, model=model)
        if result.publish is not None:
            if result.publish in artifacts:
                artifacts = self._publish(job, model, artifacts, artifacts[result.publish], result.message)
            else:
                log.warning("job %s: stage %s asked to publish %r, which is not one of its artifacts",
                            job_id, stage, result.publish)
        fields = {k: v for k, v in result.model.items() if k != "artifacts"}  # paths come from model_artifacts
        fields["artifacts"] = {name: artifacts[key] for name, key in result.model_artifacts.items() if key in artifacts}
        modelregistry.update_entry(self.store, job_id, stage, fields)
        return artifacts

    def _publish(self, job: JobRecord, model: ModelRef, artifacts: dict[str, str], folder: str,
                 message: str) -> dict[str, str]:
        """Move the folder to models/<name>/v<version>/ (atomic rename, same filesystem); paths inside follow."""
        src = Path(folder)
        dest = publish_model_dir(src, self.layout.models / model.name, model.version, job.id)
        moved = {k: str(dest / Path(v).relative_to(src)) if Path(v).is_relative_to(src) else v
                 for k, v in artifacts.items()}
        self.notify_job(job, "exported", "model_exported", f"trainbox exported {job.name} v{model.version}",
                        f"{message}\n{dest}".strip())
        return moved

    def job_ended(self, job: JobRecord) -> None:
        """Log, record and notify that ``job`` reached its (current) end state."""
        state, error = job.state, job.error
        detail = error.splitlines()[0] if error else (job_outcome(job) if state == "succeeded" else "")
        self.store.add_event(f"job_{state}", f"{job.name} ({job.id}) {state}" + (f": {detail}" if detail else ""),
                             job_id=job.id)
        self.notify_job(job, state, f"job_{state}", f"{job.name} {state}", detail or job.id)
        log.log(logging.ERROR if state == "failed" else logging.INFO, "job %s %s%s", job.id, state,
                f": {error or detail}" if (error or detail) else "")

    def job_waiting_too_long(self, job: JobRecord) -> None:
        self.store.set_job_fields(job.id, waiting_notified=True)
        self.notify_job(job, "waiting", "job_waiting_too_long", f"trainbox: {job.name} is waiting",
                        f"no dataset matches {job.spec.datasets}")

    def stage_event(self, job_id: str, event: dict) -> None:
        """An event a stage wrote to its events file: stored; notified when ``notify.events`` routes its kind."""
        kind, message = event.pop("kind", "stage_event"), event.pop("message", "")
        self.store.add_event(kind, message, job_id=job_id, **event)
        if kind in self.settings.notify.events:  # e.g. resource_warning; others are only recorded
            self.notify(kind, kind.replace("_", " "), message, job_id=job_id)

    def notify_job(self, job: JobRecord, event: str, kind: str, title: str, body: str) -> None:
        """Notify about ``job`` when its ``notify.on`` lists ``event``, spoken too when it sets ``notify.speak``."""
        if event in job.spec.notify.on:
            self.notify(kind, title, body, speak=job.spec.notify.speak, job_id=job.id)
