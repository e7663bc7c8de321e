"""Run each queued job's stages as child processes, one slot per GPU (and CPU), and record their ends.

It only supervises: starting, watching and stopping stage processes and recording their states in the store.
What a result means for the model registry, the models/ folder and notifications is ``daemon.outcomes``'.
The store is updated only from the daemon's main thread.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon import launch, modelregistry
from daemon.children import (failure_message, is_stage_process, kill_stage, last_line, log_tail, send_stop,
                             start_stage_process, stop_orphan)
from daemon.config import DaemonSettings
from daemon.jobs import JobRecord, utcnow
from daemon.layout import Layout
from daemon.outcomes import Outcomes
from daemon.store import Store
from daemon.sweeps import SWEEP_STAGE, SweepController, shared_stage_dir, storage_errors
from trainbox.fsio import read_json
from trainbox.jobspec import TrainSpec
from trainbox.protocol import (EVENTS_FILE, EXIT_INTERRUPTED, LOG_FILE, PROGRESS_FILE, RESULT_FILE, STAGE_FILE,
                               DatasetEntry, StageSpec, read_result, write_record)

log = logging.getLogger(__name__)
PROGRESS_STORE_INTERVAL_S = 2.0


@dataclass
class Running:
    job_id: str
    index: int
    stage: str
    slots: list[str]  # one GPU per rank for a distributed train stage, else one slot
    proc: subprocess.Popen
    stage_dir: Path
    stop_reason: str | None = None  # "shutdown" or "cancel" once the daemon asked the stage to stop
    stop_sent: float | None = None
    events_offset: int = 0
    progress_seen: float = 0.0
    progress_stored: float = 0.0


class Supervisor:
    def __init__(self, layout: Layout, store: Store, settings: DaemonSettings, gpus: list[int],
                 notify: Callable[..., None]):
        self.layout = layout
        self.store = store
        self.settings = settings
        self.notify = notify
        self.capacity = {f"cuda:{i}": settings.concurrency.jobs_per_gpu for i in gpus}
        self.capacity["cpu"] = settings.concurrency.cpu_jobs
        self.running: dict[str, Running] = {}
        self.outcomes = Outcomes(layout, store, settings, notify)
        self.sweeps = SweepController(layout, store)

    # start-up -------------------------------------------------------------
    def recover(self) -> None:
        """Requeue every job that was running or interrupted; stop stages a dead daemon left behind."""
        grace = self.settings.supervisor.stop_grace_seconds
        for job in self.store.jobs_in("running", "interrupted"):
            for stage in job.stages:
                if stage.state == "running" and is_stage_process(job.pid, self.layout.stage_dir(job.id, stage.name)):
                    log.warning("stage %s of %s is still running from before; stopping it", stage.name, job.id)
                    stop_orphan(job.pid, grace)
            self.store.requeue(job.id)
            log.info("job %s will resume", job.id)

    # main-loop work -------------------------------------------------------
    def tick(self) -> None:
        for run in list(self.running.values()):
            self._poll(run)
        self._resume_self_stopped()
        self._advance_sweeps()
        self._start_queued()
        self._check_waiting()

    def busy(self) -> bool:
        # a running job without a child is a sweep whose trials are between jobs
        return bool(self.running) or self.store.has_queued_jobs() or bool(self.store.jobs_in("running"))

    def _free_slots(self, stage: str, train: TrainSpec) -> list[str] | None:
        """Slots for ``stage`` now (one per rank of a distributed train stage on GPUs), or None to wait."""
        used: dict[str, int] = {}
        for run in self.running.values():
            for slot in run.slots:
                used[slot] = used.get(slot, 0) + 1
        gpu_slots = [s for s in self.capacity if s.startswith("cuda")]
        device, wanted = train.device, 1
        if device == "cpu" or (device == "auto" and not gpu_slots):
            candidates = ["cpu"]  # CPU ranks (gloo) share the one CPU slot
        elif device == "auto" or device == "cuda":
            candidates, wanted = gpu_slots, launch.gpu_slots_wanted(stage, train, len(gpu_slots))
        else:
            candidates = [device] if device in self.capacity else []
        free = [slot for slot in candidates if used.get(slot, 0) < self.capacity[slot]]
        return free[:wanted] if len(free) >= wanted else None

    def _start_queued(self) -> None:
        for job in self.store.queued_jobs():
            if job.id in self.running:
                continue
            index = job.first_unfinished()
            if index is None:
                self._finish(job.id, "succeeded")
                continue
            if job.stages[index].name == SWEEP_STAGE and not self._sweep_trials_ended(job, index):
                continue
            slots = self._free_slots(job.stages[index].name, job.spec.train)
            if slots is not None:
                self._start_stage(job, index, slots)

    def _start_stage(self, job: JobRecord, index: int, slots: list[str]) -> None:
        stage = job.stages[index].name
        stage_dir = self.layout.stage_dir(job.id, stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / RESULT_FILE).unlink(missing_ok=True)  # a previous attempt's verdict must not be read
        write_record(stage_dir / STAGE_FILE, self._stage_spec(job, stage, slots[0]))
        train = job.spec.train
        env = {"CUDA_VISIBLE_DEVICES": ",".join(s.split(":")[1] for s in slots if s.startswith("cuda"))}
        command = launch.stage_command(stage, stage_dir, train, launch.ranks_here(train, slots), job.name,
                                       self.settings.supervisor.stop_grace_seconds)
        where = ",".join(slots)
        with open(stage_dir / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(f"\n=== trainbox: stage {stage} of {job.id} started at {utcnow()} on {where} ===\n")
        proc = start_stage_process(command, stage_dir, stage_dir / LOG_FILE, env)
        events = stage_dir / EVENTS_FILE
        self.running[job.id] = Running(job.id, index, stage, slots, proc, stage_dir,
                                       events_offset=events.stat().st_size if events.exists() else 0)
        self.store.stage_started(job.id, index, pid=proc.pid, device=where)
        log.info("job %s: stage %s started (pid %d, %s)", job.id, stage, proc.pid, where)

    def _stage_spec(self, job: JobRecord, stage: str, slot: str) -> StageSpec:
        results = {s.name: read_result(shared_stage_dir(self.layout, job, s.name)).model_dump(mode="json")
                   for s in job.stages if s.finished}
        datasets = []
        for sha in job.datasets:
            ds = self.store.dataset(sha)
            datasets.append(DatasetEntry(name=ds["name"], sha256=sha, path=self.layout.home / ds["path"],
                                         format=ds["format"], rows=ds["rows"]))
        model = job.model
        previous = modelregistry.previous_version(self.store, model.name, model.version) if model else None
        return StageSpec(job_id=job.id, stage=stage, home=self.layout.home, job=job.spec, datasets=datasets,
                         results=results, device="cuda" if slot.startswith("cuda") else "cpu",
                         stage_dirs={s.name: shared_stage_dir(self.layout, job, s.name) for s in job.stages},
                         settings={"resources": self.settings.resources.model_dump()},
                         model=model.model_dump() if model else None, previous_model=previous,
                         trial=job.trial.ref if job.trial else None)

    # sweeps ---------------------------------------------------------------
    def _advance_sweeps(self) -> None:
        """Sweeps whose trials run: tell and ask their studies; queue the report of those whose trials ended."""
        for job in self.store.jobs_in("running"):
            if job.stage == SWEEP_STAGE and job.id not in self.running and self.sweeps.due(job.id) and \
                    self._sweep_advance(job):
                self.store.requeue(job.id)  # its report stage starts on this tick

    def _sweep_trials_ended(self, job: JobRecord, index: int) -> bool:
        """True when the sweep's report can start; else its sweep stage runs (without a child) until it can."""
        ended = self._sweep_advance(job)
        if not ended and self.store.job(job.id).state == "queued":
            self.store.update_job(job.id, lambda j: run_without_child(j, index))
        return ended

    def _sweep_advance(self, job: JobRecord) -> bool:
        try:
            return self.sweeps.advance(job)
        except storage_errors() as exc:
            storage = job.spec.sweep.storage or "state/optuna.db"
            error = (f"the sweep's study storage ({storage}) failed: {exc}; fix it (sweep.storage) and run "
                     f"'trainbox retry {job.id}'")
            index = job.first_unfinished()
            if self.store.job(job.id).state == "queued":
                self.store.update_job(job.id, lambda j: run_without_child(j, index))
            self.store.stage_ended(job.id, index, "failed", error=error)
            self._finish(job.id, "failed", error)
            return False

    # a running stage ------------------------------------------------------
    def _poll(self, run: Running) -> None:
        self._forward_events(run)
        code = run.proc.poll()
        if code is None:
            self._store_progress(run)
            if run.stop_sent and time.monotonic() - run.stop_sent > self.settings.supervisor.stop_grace_seconds:
                log.warning("stage %s of %s did not stop within the grace period; killing it", run.stage, run.job_id)
                kill_stage(run.proc)
            return
        del self.running[run.job_id]
        self._store_progress(run, force=True)
        if code == 0:
            self._stage_done(run)
        elif run.stop_reason == "cancel":
            self._stage_ended(run, "cancelled", None)
            self._finish(run.job_id, "cancelled")
        elif code == EXIT_INTERRUPTED and run.stop_reason is None:
            # nobody asked it to stop: the stage stopped itself on a condition that clears (a full disk)
            last = last_line(log_tail(run.stage_dir / LOG_FILE, 20))
            self._stage_ended(run, "interrupted", None)
            wait = self.settings.supervisor.self_stop_resume_seconds
            self._finish(run.job_id, "interrupted", f"stage {run.stage} stopped itself and is resumable; trainbox "
                         f"resumes it in {wait:g} s (its log ends with: {last})")
            self.store.set_job_fields(run.job_id, resume_at=time.time() + wait)
        elif code == EXIT_INTERRUPTED or run.stop_reason == "shutdown":
            self._stage_ended(run, "interrupted", None)
            self._finish(run.job_id, "interrupted")
        else:
            error = failure_message(run.stage, code, read_result(run.stage_dir).error, run.stage_dir / LOG_FILE,
                                    self.settings.supervisor.log_tail_lines)
            self._stage_ended(run, "failed", error, exit_code=code)
            self._finish(run.job_id, "failed", error)

    def _resume_self_stopped(self) -> None:
        """Requeue jobs whose stage stopped itself once their wait is over (the daemon's own stops wait for a
        restart or 'trainbox retry', as before)."""
        now = time.time()
        for job in self.store.interrupted_jobs_due(now):
            log.info("job %s: resuming its stage that stopped itself", job.id)
            self.store.requeue(job.id)

    def _stage_ended(self, run: Running, state: str, error: str | None, exit_code: int | None = None) -> None:
        self.store.stage_ended(run.job_id, run.index, state, error=error, exit_code=exit_code)

    def _stage_done(self, run: Running) -> None:
        result = read_result(run.stage_dir)
        artifacts = self.outcomes.stage_succeeded(run.job_id, run.stage, run.stage_dir, result)
        job = self.store.stage_ended(run.job_id, run.index, "skipped" if result.skipped else "succeeded",
                                     summary=result.summary, artifacts=artifacts, message=result.message)
        log.info("job %s: stage %s %s", run.job_id, run.stage, job.stages[run.index].state)
        if result.skip_rest:  # e.g. a pruned trial: nothing left to evaluate
            job = self.store.update_job(run.job_id, lambda j: skip_later_stages(j, run.index, result.skip_rest))
        if job.first_unfinished() is None:
            self._finish(run.job_id, "succeeded")
            if run.stage == SWEEP_STAGE:
                self.sweeps.report_written(job, result.summary)

    def _store_progress(self, run: Running, force: bool = False) -> None:
        path = run.stage_dir / PROGRESS_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        now = time.monotonic()
        if mtime == run.progress_seen or (not force and now - run.progress_stored < PROGRESS_STORE_INTERVAL_S):
            return
        progress = read_json(path)
        if progress is not None:
            run.progress_seen, run.progress_stored = mtime, now
            self.store.set_job_fields(run.job_id, progress=progress)

    def _forward_events(self, run: Running) -> None:
        path = run.stage_dir / EVENTS_FILE
        try:
            with open(path, "rb") as fh:
                fh.seek(run.events_offset)
                data = fh.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next tick
        run.events_offset += len(complete)
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.warning("unreadable event line in %s", path)
                continue
            self.outcomes.stage_event(run.job_id, event)

    # job ends -------------------------------------------------------------
    def _finish(self, job_id: str, state: str, error: str | None = None) -> None:
        self.outcomes.job_ended(self.store.finish_job(job_id, state, error))

    def _check_waiting(self) -> None:
        limit = self.settings.notify.waiting_too_long_seconds
        now = time.time()
        for job in self.store.jobs_in("waiting"):
            if not job.waiting_notified and now - datetime.fromisoformat(job.created_at).timestamp() > limit:
                self.outcomes.job_waiting_too_long(job)

    # requests and shutdown -------------------------------------------------
    def cancel(self, job_id: str) -> None:
        job = self.store.job(job_id)
        if job is not None and job.spec.kind == "sweep":
            self.sweeps.cancel_trials(job_id, self.cancel)
        run = self.running.get(job_id)
        if run is None:
            self.store.cancel(job_id)
            log.info("job %s cancelled", job_id)
            return
        run.stop_reason, run.stop_sent = "cancel", time.monotonic()
        send_stop(run.proc)

    def stop_all(self) -> None:
        """Ask every stage to checkpoint and exit; wait up to the grace period, then kill."""
        for run in self.running.values():
            run.stop_reason, run.stop_sent = "shutdown", time.monotonic()
            send_stop(run.proc)
        deadline = time.monotonic() + self.settings.supervisor.stop_grace_seconds
        while self.running and time.monotonic() < deadline:
            for run in list(self.running.values()):
                self._poll(run)
            time.sleep(0.1)
        for run in list(self.running.values()):
            log.warning("stage %s of %s did not stop in time; killing it", run.stage, run.job_id)
            kill_stage(run.proc)
            run.proc.wait()
            self._poll(run)


def run_without_child(job: JobRecord, index: int) -> None:
    """A sweep's ``sweep`` stage while its trials run: running, with no process of its own."""
    stage = job.stages[index]
    stage.move_to("running")
    stage.started_at, stage.ended_at, stage.error = stage.started_at or utcnow(), None, None
    job.move_to("running")
    job.stage, job.pid, job.error = stage.name, None, None


def skip_later_stages(job: JobRecord, index: int, reason: str) -> None:
    """Skip the stages after ``index`` with ``reason`` (the stage's ``skip_rest``)."""
    for stage in job.stages[index + 1:]:
        if stage.state == "pending":
            stage.move_to("skipped")
            stage.message = reason
