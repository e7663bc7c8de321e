"""``sweep.method: lr_zoom``: a hierarchical learning-rate search on top of the sweep controller.

Stage 0 tries learning rates log-spaced over the range; each next stage spaces its points evenly (in log) between
the best so far's neighbours on the previous stage's spacing, so the search zooms in. A learning rate within
10 % of one already tried (in this run or an earlier run of the same job name, from
``sweeps/<name>/lr_sweep_cumulative.json``) is not run again. Each stage's points are enqueued in the study as
fixed trials; the daemon's sweep controller runs them like any other trial. Torch-free and daemon-free: the
controller plans and records with it, the sweep stage's report reads the cumulative file with it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainbox.fsio import read_json, write_json_atomically
from trainbox.jobspec import JobSpec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
CUMULATIVE = "lr_sweep_cumulative.json"
SAME_LR = 0.10  # relative distance under which two learning rates count as the same run
KEY = "train.learning_rate"


def folder(home: Path, name: str) -> Path:
    """``<home>/sweeps/<job name>/``: what accumulates across runs of one job name."""
    return Path(home) / "sweeps" / name


def load_points(home: Path, name: str) -> list[dict[str, Any]]:
    return (read_json(folder(home, name) / CUMULATIVE, {}) or {}).get("points", [])


def record_point(home: Path, spec: JobSpec, sweep_id: str, number: int, learning_rate: float,
                 stage: int | None, value: float | None, state: str) -> None:
    """Add (or replace) one finished trial in the job name's cumulative file."""
    points = [p for p in load_points(home, spec.name) if (p["sweep_job"], p["trial"]) != (sweep_id, number)]
    points.append({"learning_rate": learning_rate, "value": value, "state": state, "stage": stage,
                   "sweep_job": sweep_id, "trial": number})
    write_json_atomically(folder(home, spec.name) / CUMULATIVE, {
        "job": spec.name, "metric": spec.sweep.metric, "objective": spec.sweep.objective,
        "direction": spec.sweep.direction, "points": points})


def log_spaced(low: float, high: float, n: int) -> list[float]:
    if n == 1 or high <= low:
        return [low]
    inner = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (n - 1)) for i in range(1, n - 1)]
    return [low, *inner, high]  # the ends exactly as written, not exp(log(x))


def best_point(points: list[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    scored = [p for p in points if p["state"] == "complete" and p["value"] is not None]
    if not scored:
        return None
    return (max if direction == "maximize" else min)(scored, key=lambda p: p["value"])


def stage_points(stage: int, counts: list[int], low: float, high: float, best_lr: float | None) -> list[float]:
    """The learning rates zoom stage ``stage`` aims at: ``counts[0]`` log-spaced over the whole range for stage
    0; else ``counts[stage]`` points evenly inside the span between the best's neighbours on the previous
    stage's spacing (those neighbours were tried already), clipped to the range."""
    if stage == 0 or best_lr is None:
        return log_spaced(low, high, counts[0])
    log_ratio = (math.log(high) - math.log(low)) / (counts[0] - 1)  # stage 0's neighbour spacing
    for k in range(1, stage):
        log_ratio *= 2 / (counts[k] + 1)  # stage k spaced its points over two of the previous spacings
    n = counts[stage]
    points = [best_lr * math.exp(log_ratio * (2 * i / (n + 1) - 1)) for i in range(1, n + 1)]
    return [min(max(lr, low), high) for lr in points]


def is_new(lr: float, tried: list[float]) -> bool:
    return all(abs(lr / t - 1) > SAME_LR for t in tried)


def enqueue_next_stage(study: "optuna.Study", spec: JobSpec, sweep_id: str, home: Path) -> None:
    """Enqueue the next zoom stage's new learning rates (none once every stage is done or nothing is new)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state.name in ("WAITING", "RUNNING") for t in trials):
        return
    stages = [t.user_attrs["zoom_stage"] for t in trials if "zoom_stage" in t.user_attrs]
    done = study.user_attrs.get("zoom_stages_done", -1)
    stage = max([done, *stages]) + 1
    param = spec.sweep.params[KEY]
    counts = spec.sweep.zoom_stages()
    points = load_points(home, spec.name)
    while stage < len(counts):
        best = best_point(points, spec.sweep.direction)
        aimed = stage_points(stage, counts, param.low, param.high, best["learning_rate"] if best else None)
        tried = [p["learning_rate"] for p in points] + [t.params[KEY] for t in trials if KEY in t.params]
        new = []
        for lr in aimed:
            lr = min(max(lr, param.low), param.high)  # exp(log(x)) may land a rounding error outside the range
            if is_new(lr, tried + new):
                new.append(lr)
        skipped = len(aimed) - len(new)
        log.info("sweep %s: lr_zoom stage %d tries %s%s", sweep_id, stage,
                 ", ".join(f"{lr:.3g}" for lr in new) or "nothing new",
                 f" ({skipped} within {SAME_LR:.0%} of a learning rate already tried)" if skipped else "")
        for lr in new:
            study.enqueue_trial({KEY: lr}, user_attrs={"zoom_stage": stage, "sweep_job": sweep_id})
        study.set_user_attr("zoom_stages_done", stage if not new else stage - 1)
        if new:
            return
        stage += 1
