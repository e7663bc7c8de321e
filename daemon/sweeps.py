"""The sweep controller: a ``kind: sweep`` job asks its Optuna study for trials and runs each as a child job.

A sweep job's own stages are those its trials share (``prepare``, and ``augment`` unless an ``augment.*`` key
is swept) and ``sweep`` (the report, a child process
started once every trial has ended). While trials run, the ``sweep`` stage is ``running`` without a process:
this controller, called from the supervisor's tick, tells the study each finished trial's outcome and asks
for the next ones, ``parallel`` at a time. The study (Optuna RDB storage) is the record of what was asked and
told, so a daemon killed at any point resumes without sampling a trial again or counting one twice.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from daemon.jobs import ACTIVE_STATES, JobRecord, StageRecord, TrialRecord, new_job_id, utcnow
from daemon.layout import Layout
from daemon.store import Store
from trainbox import lrzoom
from trainbox.jobspec import JobSpec
from trainbox.protocol import TrialRef
from trainbox.study import (apply_params, ask, beat, distributions, fail_lost_trials, make_sampler,
                            objective_value, open_study, shared_stages, span, storage_url)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
SWEEP_STAGE = "sweep"
ADVANCE_INTERVAL_S = 1.0  # each advance reads the study: a few queries, not on every 0.2 s tick
HEARTBEAT_S = 30.0  # at most this long between heartbeats of a running trial (more often for a short lost_after)


def storage_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or broken study storage raises (imported late: optuna and sqlalchemy are heavy);
    ImportError: the storage's database driver is missing."""
    from optuna.exceptions import OptunaError
    from sqlalchemy.exc import SQLAlchemyError

    return OptunaError, SQLAlchemyError, ImportError


class SweepController:
    def __init__(self, layout: Layout, store: Store):
        self.layout = layout
        self.store = store
        self._studies: dict[str, Any] = {}
        self._advanced: dict[str, float] = {}
        self._beaten: dict[str, float] = {}

    # the study ---------------------------------------------------------------
    def study(self, sweep: JobRecord) -> "optuna.Study":
        if sweep.id not in self._studies:
            sw = sweep.spec.sweep
            self._studies[sweep.id] = open_study(storage_url(sw, self.layout.home), sw.study_name(sweep.id),
                                                 sw.direction, sw.pruner, sw.trial_count, _lost_after_s(sweep))
        return self._studies[sweep.id]

    # the supervisor's calls ------------------------------------------------------
    def due(self, sweep_id: str) -> bool:
        """Whether a running sweep is due for another look at its study (at most once a second)."""
        now = time.monotonic()
        if now - self._advanced.get(sweep_id, 0.0) < ADVANCE_INTERVAL_S:
            return False
        self._advanced[sweep_id] = now
        return True

    def advance(self, sweep: JobRecord) -> bool:
        """Tell finished trials, ask new ones up to ``parallel``; True once every trial has ended."""
        sw = sweep.spec.sweep
        study = self.study(sweep)
        if sweep.sweep_started_at is None:
            sweep = self.store.set_job_fields(sweep.id, sweep_started_at=time.time())
        for child in self.store.trials_of(sweep.id):
            self._record(study, sweep, child)
        self._continue_paused(self.store.trials_of(sweep.id))
        self._adopt(study, sweep, self.store.trials_of(sweep.id))
        self._keep_alive(study, sweep)
        active = [c for c in self.store.trials_of(sweep.id) if c.state in ACTIVE_STATES]
        timed_out = bool(sw.timeout_minutes) and time.time() - sweep.sweep_started_at > sw.timeout_minutes * 60
        if sw.method == "lr_zoom" and not active and not timed_out:
            lrzoom.enqueue_next_stage(study, sweep.spec, sweep.id, self.layout.home)
        while len(active) < sw.parallel and not timed_out and self._wants_trial(study, sweep.spec):
            child = self._ask(study, sweep)
            if child is None:
                break
            active.append(child)
        counted = self._counted(study)
        unfinished = [t for t in counted if t.state.name in ("RUNNING", "WAITING")]
        self._show_progress(sweep, len(counted) - len(unfinished),
                            sw.trial_count if sw.method == "optuna" else len(counted))
        if active or (unfinished and not timed_out):
            return False  # another daemon's trials (a shared study) still run: the report waits for them
        return True

    def _keep_alive(self, study: "optuna.Study", sweep: JobRecord) -> None:
        """Heartbeats for this daemon's running trials, then fail the trials of daemons that stopped sending
        them (a machine sharing the study died), so the sweep does not wait for them forever."""
        lost_after = _lost_after_s(sweep)
        now = time.monotonic()
        if now - self._beaten.get(sweep.id, 0.0) < min(HEARTBEAT_S, lost_after / 4):
            return
        self._beaten[sweep.id] = now
        beat(study, [c.trial.ref.trial_id for c in self.store.trials_of(sweep.id)
                     if c.state in ACTIVE_STATES and c.trial.state == "running"])
        for number in fail_lost_trials(study, lost_after):
            message = (f"{sweep.name}: trial {number} failed as lost: the daemon running it sent no heartbeat for "
                       f"{span(lost_after)} (sweep.lost_after_minutes)")
            self.store.add_event("trial_failed", message, job_id=sweep.id, sweep=sweep.id)
            log.warning("sweep %s: %s", sweep.id, message)

    def _show_progress(self, sweep: JobRecord, finished: int, total: int) -> None:
        """Trials ended / planned as the sweep job's progress (what jobs and top show for it)."""
        progress = {"stage": SWEEP_STAGE, "step": finished, "total_steps": total, "unit": "trials"}
        if self.store.job(sweep.id).progress != progress:
            self.store.set_job_fields(sweep.id, progress=progress)

    def cancel_trials(self, sweep_id: str, cancel: Callable[[str], None]) -> None:
        """Cancel the sweep's active trials; they continue when the sweep is retried."""
        for child in self.store.trials_of(sweep_id):
            if child.state in ACTIVE_STATES:
                self.store.update_job(child.id, _pause)
                cancel(child.id)

    # trials ------------------------------------------------------------------------
    def _counted(self, study: "optuna.Study") -> list[Any]:
        return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]

    def _wants_trial(self, study: "optuna.Study", spec: JobSpec) -> bool:
        if spec.sweep.method == "lr_zoom":
            return any(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False))
        return len(self._counted(study)) < spec.sweep.trial_count

    def _ask(self, study: "optuna.Study", sweep: JobRecord) -> JobRecord | None:
        spec, sw = sweep.spec, sweep.spec.sweep
        shared = "" if sw.storage is None or sw.storage.startswith("sqlite") else str(self.layout.home)
        sampler = make_sampler(sw, spec.seed, len(study.get_trials(deepcopy=False)), shared)
        trial = ask(study, distributions(sw), sampler)
        trial.set_user_attr("sweep_job", sweep.id)
        if sw.method == "optuna" and trial.number >= sw.trial_count:
            # another daemon sharing the study asked the last one at the same moment
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=_state("FAIL"))
            log.info("sweep %s: trial %d is beyond trials=%d (asked concurrently elsewhere); not run",
                     sweep.id, trial.number, sw.trial_count)
            return None
        beat(study, [trial._trial_id])  # from now on a dead daemon's trial can be told apart
        return self._create_trial_job(sweep, trial.number, trial._trial_id, dict(trial.params),
                                      trial.user_attrs.get("zoom_stage"))

    def _adopt(self, study: "optuna.Study", sweep: JobRecord, children: list[JobRecord]) -> None:
        """Trials this sweep asked whose job was never written (the daemon died in between): run them now."""
        known = {c.trial.number for c in children}
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "RUNNING" and t.user_attrs.get("sweep_job") == sweep.id and t.number not in known:
                log.warning("sweep %s: trial %d was asked but has no job; running it now", sweep.id, t.number)
                self._create_trial_job(sweep, t.number, t._trial_id, dict(t.params), t.user_attrs.get("zoom_stage"))

    def _create_trial_job(self, sweep: JobRecord, number: int, trial_id: int, params: dict[str, Any],
                          zoom_stage: int | None = None) -> JobRecord:
        spec, sw = sweep.spec, sweep.spec.sweep
        trial_spec = apply_params(spec, params).model_copy(update={
            "name": f"{spec.name[:56]}.t{number:03d}",
            "notify": spec.notify.model_copy(update={"on": []})})  # the sweep notifies once, when it ends
        now, shared = utcnow(), shared_stages(spec)
        stages = [StageRecord(name=n, state="succeeded", ended_at=now, message=f"shared with sweep {sweep.id}")
                  if n in shared else StageRecord(name=n)
                  for n in trial_spec.stages if n != "export"]  # export runs once, for the best trial
        ref = TrialRef(storage=storage_url(sw, self.layout.home), study=sw.study_name(sweep.id), trial_id=trial_id,
                       number=number, direction=sw.direction, pruner=sw.pruner, trials=sw.trial_count)
        job = JobRecord(id=new_job_id(trial_spec.name), name=trial_spec.name, state="queued", stages=stages,
                        created_at=now, updated_at=now, spec=trial_spec, datasets=list(sweep.datasets),
                        source=f"sweep {sweep.id}", parent=sweep.id, shared={n: sweep.id for n in shared},
                        trial=TrialRecord(number=number, params=params, zoom_stage=zoom_stage, ref=ref))
        self.store.insert_job(job)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
        self.store.add_event("trial_started", f"{spec.name} trial {number}: {shown}", job_id=job.id, sweep=sweep.id)
        log.info("sweep %s: trial %d (%s) is job %s", sweep.id, number, shown, job.id)
        return job

    def _continue_paused(self, children: list[JobRecord]) -> None:
        """Trials cancelled with their sweep run on when the sweep does (retry), from their checkpoints."""
        for child in children:
            if child.state == "cancelled" and child.trial.paused:
                self.store.retry(child.id)
                self.store.update_job(child.id, _unpause)
                log.info("trial %d (%s) continues", child.trial.number, child.id)

    def _record(self, study: "optuna.Study", sweep: JobRecord, child: JobRecord) -> None:
        """Tell the study how a trial job ended (once: the job's trial state says it was told)."""
        trial, sw = child.trial, sweep.spec.sweep
        if trial.state != "running" or child.state not in ("succeeded", "failed", "cancelled"):
            return
        if child.state == "cancelled" and trial.paused:
            return
        summary: dict[str, Any] = {}
        for stage in child.stages:
            summary.update(stage.summary)
        value, note = None, ""
        if child.state == "cancelled":
            state, note = "FAIL", "cancelled"
        elif child.state == "failed":
            state, note = "FAIL", (child.error or "failed").splitlines()[0]
        elif summary.get("pruned_at_step") is not None:
            state, note = "PRUNED", f"pruned at step {summary['pruned_at_step']}"
        else:
            try:
                value, state = objective_value(sw, summary), "COMPLETE"
            except KeyError as exc:
                state, note = "FAIL", str(exc.args[0])
        import optuna

        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if frozen.state.name == "RUNNING" and note:
            optuna.trial.Trial(study, trial.ref.trial_id).set_user_attr("note", note)
        if frozen.state.name != "RUNNING":  # failed as lost by a daemon sharing the study while this one was away
            away = frozen.user_attrs.get("note") or f"ended as {frozen.state.name.lower()}"
            note = f"the study had already ended this trial ({away}); this result is kept in this job only"
            log.warning("sweep %s: trial %d: %s", sweep.id, trial.number, note)
        study.tell(trial.number, value if state == "COMPLETE" else None, state=_state(state), skip_if_finished=True)
        told = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[state]

        def mark(job: JobRecord) -> None:
            job.trial.state, job.trial.value, job.trial.note = told, value, note
        self.store.update_job(child.id, mark)
        label = "objective" if sw.objective else sw.metric
        message = (f"{sweep.name} trial {trial.number} {told}" + (f": {note}" if note else "")
                   + (f": {label} {value:.4f}" if value is not None else ""))
        self.store.add_event(f"trial_{told}", message, job_id=child.id, sweep=sweep.id)
        log.info("sweep %s: %s", sweep.id, message)
        if sw.method == "lr_zoom":
            lrzoom.record_point(self.layout.home, sweep.spec, sweep.id, trial.number, trial.params[lrzoom.KEY],
                                trial.zoom_stage, value, told)

    # after the sweep ------------------------------------------------------------------
    def report_written(self, sweep: JobRecord, summary: dict[str, Any]) -> None:
        """The sweep ended with its report: start its follow-up job (``then: train_best``)."""
        if sweep.spec.sweep.then != "train_best":
            return
        follow = self.train_best(sweep, summary)
        if follow:
            self.store.add_event("job_created", f"{follow.name} ({follow.id}) continues sweep {sweep.id} with its "
                                 "best trial", job_id=follow.id)

    def train_best(self, sweep: JobRecord, summary: dict[str, Any]) -> JobRecord | None:
        """The follow-up job of ``then: train_best``: the best trial's model through the remaining stages."""
        number = summary.get("best_trial")
        best = next((c for c in self.store.trials_of(sweep.id) if c.trial.number == number), None)
        if best is None:
            log.warning("sweep %s: no trial job for the best trial %s; no follow-up job", sweep.id, number)
            return None
        spec = apply_params(sweep.spec, best.trial.params)
        shared = {**{name: sweep.id for name in shared_stages(sweep.spec)}, "train": best.id}
        shared.update({name: best.id for name in ("augment",) if name in spec.stages and name not in shared})
        now = utcnow()
        stages = [StageRecord(name=n, state="succeeded", ended_at=now, message=f"shared with {shared[n]}",
                              summary=best.stage_named("train").summary if n == "train" else {})
                  if n in shared else StageRecord(name=n) for n in spec.stages]
        job = JobRecord(id=new_job_id(spec.name), name=spec.name, state="queued", stages=stages, created_at=now,
                        updated_at=now, spec=spec, datasets=list(sweep.datasets), source=f"sweep {sweep.id}",
                        shared=shared, sweep=sweep.id)
        self.store.insert_job(job)
        log.info("sweep %s: job %s continues with trial %d's model (%s)", sweep.id, job.id, number, best.trial.params)
        return job


def _lost_after_s(sweep: JobRecord) -> int:
    return max(1, round(sweep.spec.sweep.lost_after_minutes * 60))


def shared_stage_dir(layout: Layout, job: JobRecord, stage: str) -> Path:
    """Where ``job``'s ``stage`` lives: its own folder, or the job it shares that stage with (a sweep's prepare)."""
    return layout.stage_dir(job.shared.get(stage, job.id), stage)


def _pause(job: JobRecord) -> None:
    job.trial.paused = True


def _unpause(job: JobRecord) -> None:
    job.trial.paused = False


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
