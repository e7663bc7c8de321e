"""Sweep trials: report each in-training eval loss to the trial's Optuna study and stop when it prunes.

The train child talks to the study storage directly (Optuna's RDB storage is made for many writers), so the
decision comes at the step it is due, without a round trip through the daemon.
"""
from __future__ import annotations

import logging
from typing import Callable

from handlers.context import StageContext
from trainbox.study import intermediate_value, open_study

log = logging.getLogger(__name__)


class Pruned(Exception):
    """The study's pruner stopped this trial at ``step``."""

    def __init__(self, step: int, eval_loss: float):
        super().__init__(f"pruned at step {step} (eval loss {eval_loss:.4f})")
        self.step, self.eval_loss = step, eval_loss


def pruning_check(ctx: StageContext) -> Callable[[int, float], bool] | None:
    """``should_prune(step, eval_loss)`` for a sweep trial's train stage; None outside a sweep or without pruner."""
    ref = ctx.trial
    if ref is None or ref.pruner == "none":
        return None
    import optuna

    study = open_study(ref.storage, ref.study, ref.direction, ref.pruner, ref.trials)
    trial = optuna.trial.Trial(study, ref.trial_id)

    ended = False

    def should_prune(step: int, eval_loss: float) -> bool:
        nonlocal ended
        if ended:
            return False
        # a resumed run reports its steps again: Optuna keeps the first value of a step and ignores the repeat
        try:
            trial.report(intermediate_value(ref.direction, eval_loss), step)
        except optuna.exceptions.UpdateFinishedTrialError:
            # a daemon sharing the study failed this trial as lost while ours was away: finish without pruning
            log.warning("trial %d: the study has already ended this trial (failed as lost while its daemon was "
                        "away); training goes on without pruning", ref.number)
            ended = True
            return False
        prune = trial.should_prune()
        if prune:
            log.info("trial %d: the %s pruner stops it at step %d (eval loss %.4f)", ref.number, ref.pruner, step,
                     eval_loss)
        return prune
    return should_prune
