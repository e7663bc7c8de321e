"""What watches a training run from the side: the process's own APScheduler (checkpoint and progress-log flags,
resource sampling), and optional TensorBoard. None of it touches the model between steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.resources import ResourceWatch
from handlers.context import StageContext
from handlers.train import progress
from handlers.train.loop import TrainRun

log = logging.getLogger(__name__)
logging.getLogger("apscheduler").setLevel(logging.WARNING)  # "job executed" lines every few seconds otherwise


@dataclass
class Observers:
    scheduler: BackgroundScheduler
    tensorboard: Any = None

    @classmethod
    def start(cls, ctx: StageContext, run: TrainRun) -> "Observers":
        spec = ctx.job.train
        resources = ctx.settings.get("resources", {})
        watch = ResourceWatch(resources, ctx.emit_event)

        def sample() -> None:
            snap = progress.system_snapshot(run.device)
            run.system.update(snap)
            watch.check(snap)

        run.on_event = ctx.emit_event
        run.write_progress_log = lambda fields: progress.write_progress_log(ctx.stage_dir, {**fields, **run.system})
        sample()
        run.write_progress_log({"epoch": run.state.epoch, "step": run.state.step, "total_steps": run.total_steps,
                                "loss": None, "learning_rate": run.scheduler.get_last_lr()[0],
                                "samples_per_s": None, "tokens_per_s": None, "eta_s": None})
        tensorboard = open_tensorboard(ctx) if spec.tensorboard else None
        if tensorboard is not None:
            run.on_row = lambda row: log_scalars(tensorboard, row)
        # timers only raise flags: the loop saves and logs at the next step boundary
        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(run.flags.checkpoint_due.set, "interval", seconds=spec.checkpoint.interval_seconds,
                          id="checkpoint", coalesce=True)
        scheduler.add_job(run.flags.progress_due.set, "interval", seconds=spec.progress_log.interval_seconds,
                          id="progress_log", coalesce=True)
        scheduler.add_job(sample, "interval", seconds=float(resources.get("check_seconds", 30)), id="resources",
                          coalesce=True, max_instances=1)
        scheduler.start()
        return cls(scheduler, tensorboard)

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        if self.tensorboard is not None:
            self.tensorboard.close()


def open_tensorboard(ctx: StageContext) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard is on but the tensorboard package is missing; pip install tensorboard")
        return None
    return SummaryWriter(log_dir=str(ctx.stage_dir / "tensorboard"))


def log_scalars(writer: Any, row: dict[str, Any]) -> None:
    for key, value in row.items():
        if key not in ("step", "time") and isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, row["step"])
