"""Sweep rules without training: what a sweep job may say, the trial specs it makes, the objective, and the
lr_zoom plan against a real Optuna study (SQLite in tmp_path)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from daemon.layout import Layout
from trainbox import lrzoom
from trainbox.jobfile import load_job_file
from trainbox.jobspec import JobSpec
from trainbox.preflight import check_job
from trainbox.study import (apply_params, ask, beat, distributions, fail_lost_trials, make_sampler, objective_value,
                            open_study)

from conftest import REPO

BASE = {"name": "s", "kind": "sweep", "datasets": ["d.jsonl"], "stages": ["prepare", "train", "evaluate"],
        "sweep": {"trials": 4, "params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                   "log": True}}}}


def spec_with(**sweep: object) -> JobSpec:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["sweep"].update(sweep)
    doc["sweep"] = {k: v for k, v in doc["sweep"].items() if v is not None}  # None: leave the key out
    return JobSpec.model_validate(doc)


def problems(spec: JobSpec) -> list[str]:
    return [p.sentence() for p in check_job(spec, gpu_count=0)]


def test_shipped_sweep_config_is_accepted() -> None:
    spec = load_job_file(REPO / "configs/jobs/sweep.yaml")
    assert spec.kind == "sweep" and problems(spec) == []


def test_params_must_name_real_keys_with_values_the_schema_accepts() -> None:
    bad = problems(spec_with(params={"train.lora.rank": {"type": "int", "low": 4, "high": 8},
                                     "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 1.5},
                                     "name": {"type": "categorical", "choices": ["a", "b"]}}))
    assert any("train.lora has no key 'rank'" in p and "(it has: alpha, dropout, r, target_modules)" in p
               for p in bad), bad
    assert any("sweep.params.train.warmup_ratio: the value 1.5 is not valid" in p for p in bad), bad
    assert any("name is the same for every trial" in p for p in bad), bad


def test_each_value_is_checked_as_a_trial_on_this_machine() -> None:
    bad = problems(spec_with(params={"train.method": {"type": "categorical", "choices": ["lora", "qlora"]}}))
    assert len(bad) == 1 and "a trial with train.method='qlora' could not run: qlora needs an NVIDIA GPU" in bad[0]


def test_search_space_shapes_are_checked_at_the_edge() -> None:
    for params, message in (({"train.epochs": {"type": "float", "low": 2, "high": 1}}, "low (2) is above high (1)"),
                            ({"train.lora.r": {"type": "categorical"}}, "needs 'choices"),
                            ({"train.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}},
                             "log: true needs low > 0")):
        with pytest.raises(ValueError, match=re_escape(message)):
            spec_with(params=params)
    with pytest.raises(ValueError, match="grid sampler needs a 'step'"):
        spec_with(sampler="grid")
    grid = spec_with(sampler="grid", trials=4, params={"train.lora.r": {"type": "categorical", "choices": [4, 8]},
                                                       "train.warmup_ratio": {"type": "float", "low": 0.0,
                                                                              "high": 0.1, "step": 0.1}})
    assert problems(grid) == []
    assert any("the grid has 4 points but trials is 5" in p for p in problems(grid.model_copy(update={
        "sweep": grid.sweep.model_copy(update={"trials": 5})})))


def test_export_needs_train_best_and_lr_zoom_one_parameter() -> None:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["stages"].append("export")
    assert any("export runs after the sweep only with then: train_best" in p
               for p in problems(JobSpec.model_validate(doc)))
    doc["sweep"]["then"] = "train_best"
    assert problems(JobSpec.model_validate(doc)) == []
    with pytest.raises(ValueError, match="lr_zoom runs the trials 'zoom' gives"):
        spec_with(method="lr_zoom")
    with pytest.raises(ValueError, match="lr_zoom searches one parameter"):
        spec_with(method="lr_zoom", trials=None, params={"train.lora.r": {"type": "int", "low": 2, "high": 8}})
    zoom = spec_with(method="lr_zoom", trials=None, zoom="5-4")
    assert zoom.sweep.trial_count == 9 and JobSpec.model_validate(zoom.model_dump(mode="json")) == zoom


def test_a_trial_spec_is_the_job_with_its_params() -> None:
    trial = apply_params(spec_with(), {"train.learning_rate": 0.003, "train.lora.r": 8})
    assert (trial.kind, trial.sweep, trial.train.learning_rate, trial.train.lora.r) == ("pipeline", None, 0.003, 8)


def test_objective_is_a_weighted_sum_and_names_what_is_missing() -> None:
    sweep = spec_with(objective={"critical_recall": 1, "macro_f1": 1, "ece": -1}, direction="maximize").sweep
    assert objective_value(sweep, {"critical_recall": 0.9, "macro_f1": 0.7, "ece": 0.1}) == pytest.approx(1.5)
    with pytest.raises(KeyError, match=r"no ece \(numbers it reported: critical_recall, macro_f1\)"):
        objective_value(sweep, {"critical_recall": 0.9, "macro_f1": 0.7, "task": "classification"})


def test_lr_zoom_zooms_around_the_best_and_skips_what_an_earlier_run_tried(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    spec = spec_with(method="lr_zoom", trials=None, zoom="3-3", direction="minimize")
    study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "zoom", "minimize")
    lrzoom.enqueue_next_stage(study, spec, "run1", layout.home)
    stage0 = enqueued(study)
    assert stage0 == pytest.approx([1e-4, 1e-3, 1e-2])
    for number, lr in enumerate(stage0):  # the middle one wins
        trial = study.ask()
        trial.suggest_float("train.learning_rate", 1e-4, 1e-2, log=True)
        study.tell(trial, abs(math.log10(lr) + 3))
        lrzoom.record_point(layout.home, spec, "run1", number, lr, 0, abs(math.log10(lr) + 3), "complete")
    lrzoom.enqueue_next_stage(study, spec, "run1", layout.home)
    waiting = enqueued(study)
    assert waiting == pytest.approx([10 ** -3.5, 10 ** -2.5])  # the middle point (the best) was tried
    # a second run of the same job name: stage 0 is all tried already, so it goes straight to the zoom
    fresh = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "zoom-again", "minimize")
    lrzoom.enqueue_next_stage(fresh, spec, "run2", layout.home)
    assert enqueued(fresh) == pytest.approx(waiting)
    assert [t.user_attrs["zoom_stage"] for t in fresh.get_trials()] == [1, 1]


def enqueued(study: object) -> list[float]:
    """Learning rates waiting in the study (enqueued trials keep their values as fixed params until asked)."""
    return [t.system_attrs["fixed_params"]["train.learning_rate"] for t in study.get_trials()
            if t.state.name == "WAITING"]


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_only_a_trial_whose_heartbeat_stopped_is_failed_as_lost(tmp_path: Path) -> None:
    import time

    study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "hb", "minimize", lost_after_s=2)
    stopped, alive, never = ask(study, {}), ask(study, {}), ask(study, {})
    beat(study, [stopped._trial_id, alive._trial_id])
    for _ in range(6):  # 3 s: the stopped trial's heartbeat is older than 2 s, the live one keeps beating
        time.sleep(0.5)
        beat(study, [alive._trial_id])
    assert fail_lost_trials(study, 2) == [stopped.number]
    states = {t.number: (t.state.name, t.user_attrs.get("note", "")) for t in study.get_trials()}
    assert states[stopped.number][0] == "FAIL" and "no heartbeat for 2 s" in states[stopped.number][1]
    assert states[alive.number][0] == states[never.number][0] == "RUNNING"  # never beaten: not judged
    assert fail_lost_trials(study, 2) == []


@pytest.mark.parametrize("sampler", ["grid", "tpe", "random"])
def test_a_fresh_sampler_per_ask_covers_the_grid_and_replays_the_same_trials(tmp_path: Path, sampler: str) -> None:
    """The daemon makes a new sampler for every ask (seeded by the trial count, so a restart asks what an
    uninterrupted run would): a grid is still covered once, and two studies with one seed ask the same."""
    spec = spec_with(sampler=sampler, trials=6, params={
        "train.lora.r": {"type": "categorical", "choices": [4, 8, 16]},
        "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.1}})
    asked = []
    for name in ("first", "again"):
        study = open_study(f"sqlite:///{tmp_path / 'optuna.db'}", name, "minimize")
        points = []
        for n in range(spec.sweep.trial_count):
            trial = ask(study, distributions(spec.sweep), make_sampler(spec.sweep, spec.seed, len(study.get_trials())))
            points.append((trial.params["train.lora.r"], trial.params["train.warmup_ratio"]))
            study.tell(trial, float(n))
        asked.append(points)
    assert asked[0] == asked[1]
    if sampler == "grid":
        assert sorted(asked[0]) == [(r, w) for r in (4, 8, 16) for w in (0.0, 0.1)]
