"""The training process's own APScheduler: it only raises flags (and samples resources) in the background."""
from __future__ import annotations

import logging
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.jobspec import TrainSpec
from handlers.train.loop import Flags

logging.getLogger("apscheduler").setLevel(logging.WARNING)  # "job added/executed" lines every few seconds


def start_timers(flags: Flags, spec: TrainSpec, resource_seconds: float, sample: Callable[[], None]) -> BackgroundScheduler:
    """Checkpoint flag, progress-log flag and resource sampling on their intervals; the loop acts on flags."""
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(flags.checkpoint_due.set, "interval", seconds=spec.checkpoint.interval_seconds,
                      id="checkpoint", coalesce=True)
    scheduler.add_job(flags.progress_due.set, "interval", seconds=spec.progress_log.interval_seconds,
                      id="progress_log", coalesce=True)
    scheduler.add_job(sample, "interval", seconds=resource_seconds, id="resources", coalesce=True,
                      max_instances=1)
    scheduler.start()
    return scheduler
