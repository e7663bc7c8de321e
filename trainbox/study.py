"""The Optuna side of a sweep, shared by the daemon's controller, the train stage (pruning) and the report.

Optuna is imported lazily inside the functions: importing this module stays cheap and torch-free, and the
daemon pays optuna's import (about half a second) only once a sweep exists.
"""
from __future__ import annotations

import logging
import math
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainbox.jobspec import JobSpec, SweepParam, SweepSpec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)
SQLITE_TIMEOUT_S = 60  # the daemon and every trial's train stage write the same SQLite file
SCHEMA_LOCK_KEY = zlib.crc32(b"trainbox optuna schema")  # one PostgreSQL advisory lock for every trainbox
FIXED_KEYS = ("name", "kind", "datasets", "sweep", "stages", "seed")


def storage_url(sweep: SweepSpec, home: Path) -> str:
    """The study's RDB URL: ``sweep.storage``, else SQLite at ``<home>/state/optuna.db``."""
    return sweep.storage or f"sqlite:///{Path(home).resolve() / 'state' / 'optuna.db'}"


def _driver_url(url: str) -> str:
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1 would pick psycopg 3; trainbox[postgres] installs psycopg2
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


@contextmanager
def _schema_lock(url: str):
    """Hold a PostgreSQL advisory lock while optuna creates its tables and the study: two daemons starting on
    a fresh database at the same moment would otherwise both run ``CREATE TYPE studydirection`` and one fails
    on the unique index (optuna's ``create_all`` checks, then creates, without a lock). SQLite serializes
    writers by itself."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(_driver_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def _storage(url: str, lost_after_s: int | None = None) -> "optuna.storages.RDBStorage":
    import warnings

    import optuna

    url = _driver_url(url)
    optuna.logging.disable_default_handler()  # its records go to our logging handlers instead
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if lost_after_s is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    with warnings.catch_warnings():  # heartbeats are marked experimental; their semantics have not changed since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=max(1, lost_after_s // 4),
                                          grace_period=max(1, lost_after_s))


def make_pruner(kind: str, trials: int) -> "optuna.pruners.BasePruner":
    """Median: prune below the median of earlier trials at the same step, once a quarter of the trials finished
    (at least one); Hyperband: successive halving brackets over the train steps."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, trials // 4), n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(url: str, name: str, direction: str, pruner: str = "none", trials: int = 1,
               lost_after_s: int | None = None) -> "optuna.Study":
    """Load study ``name`` from ``url``, creating it on first use (several daemons may race to create it).
    ``lost_after_s``: the daemon's study, which keeps heartbeats and fails trials that stopped sending them."""
    import optuna

    with _schema_lock(url):
        return optuna.create_study(storage=_storage(url, lost_after_s), study_name=name, direction=direction,
                                   pruner=make_pruner(pruner, trials), load_if_exists=True)


def beat(study: "optuna.Study", trial_ids: list[int]) -> None:
    """Record that this daemon is still running these trials (Optuna's trial heartbeats, in the study)."""
    for trial_id in trial_ids:
        study._storage.record_heartbeat(trial_id)


def span(seconds: float) -> str:
    """``10 min`` or ``6 s``: a duration as a user set it."""
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def ask(study: "optuna.Study", distributions: dict[str, Any],
        sampler: "optuna.samplers.BaseSampler | None" = None) -> "optuna.trial.Trial":
    """``study.ask`` with ``sampler`` (a fresh one per ask, see ``make_sampler``), which is then put away: a
    later ``tell`` runs the study's sampler's ``after_trial``, and GridSampler's calls ``study.stop()`` once the
    grid is covered, which raises outside ``optimize``. Optuna's warning that heartbeats are meant for
    ``optimize`` is silenced (the daemon records them itself, see ``beat``)."""
    import warnings

    import optuna

    if sampler is not None:
        study.sampler = sampler
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            return study.ask(distributions)
    finally:
        study.sampler = optuna.samplers.RandomSampler()  # after_trial does nothing; nothing samples with it


def fail_lost_trials(study: "optuna.Study", lost_after_s: int) -> list[int]:
    """Fail the running trials whose heartbeat is older than ``lost_after_s`` (their daemon died), each with a
    note saying so; return their numbers. Optuna's own ``fail_stale_trials`` does the same without the note,
    which the report and ``show`` print."""
    import optuna

    storage = study._storage
    lost = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        trial = optuna.trial.Trial(study, trial_id)
        try:
            trial.set_user_attr("note", f"lost: its daemon sent no heartbeat for {span(lost_after_s)} "
                                        "(sweep.lost_after_minutes)")
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its daemon told it, or another one failed it, in the meantime
        lost.append(trial.number)
    return lost


def distributions(sweep: SweepSpec) -> dict[str, Any]:
    """Optuna distributions of ``sweep.params`` (dotted key -> distribution)."""
    return {key: _distribution(p) for key, p in sweep.params.items()}


def _distribution(p: SweepParam) -> Any:
    import optuna.distributions as d

    if p.type == "categorical":
        return d.CategoricalDistribution(p.choices)
    if p.type == "int":
        return d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)


def grid_values(p: SweepParam) -> list[Any]:
    """Every value of a parameter on the grid sampler's grid."""
    if p.type == "categorical":
        return list(p.choices or [])
    step = p.step or 1
    count = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
    values = [p.low + i * step for i in range(count)]
    return [int(v) for v in values] if p.type == "int" else [round(v, 12) for v in values]


def grid_size(sweep: SweepSpec) -> int:
    return math.prod(len(grid_values(p)) for p in sweep.params.values())


def make_sampler(sweep: SweepSpec, seed: int, existing_trials: int,
                 machine: str = "") -> "optuna.samplers.BaseSampler":
    """A fresh sampler per ask, seeded by the job's seed and the trial count: a daemon restarted mid-sweep
    samples the same next trial as one that never stopped (a sampler's own RNG would restart from the seed).
    ``machine`` (its home, for a shared study) keeps two daemons asking at the same moment from drawing the
    same parameters."""
    import optuna

    if sweep.sampler == "grid":
        # GridSampler numbers the grid points in an order shuffled by its seed, and a trial records only the
        # number: every sampler of a study (each ask, each machine) needs the same seed, or numbers point to
        # other parameters (repeats, and points never tried). Which unvisited point comes next is drawn from
        # the study's trials, so it still replays after a restart.
        return optuna.samplers.GridSampler({k: grid_values(p) for k, p in sweep.params.items()},
                                           seed=seed % 2**31)
    seed = (seed * 1_000_003 + existing_trials + zlib.crc32(machine.encode())) % 2**31
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, sweep.trial_count // 3)))


def shared_stages(spec: JobSpec) -> list[str]:
    """Stages a sweep runs once for all its trials: prepare, and augment unless an ``augment.*`` key is swept."""
    swept_augment = any(key.startswith("augment.") for key in spec.sweep.params)
    return [s for s in spec.stages if s == "prepare" or (s == "augment" and not swept_augment)]


def apply_params(spec: JobSpec, params: dict[str, Any]) -> JobSpec:
    """``spec`` as one trial runs it: each dotted key set to its value, as a plain pipeline job."""
    doc = spec.model_dump(mode="json")
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    doc.update(kind="pipeline", sweep=None)
    return JobSpec.model_validate(doc)


def param_path_problem(key: str) -> str | None:
    """Why a dotted key cannot be swept (None: it can)."""
    parts = key.split(".")
    if parts[0] in FIXED_KEYS:
        return f"{parts[0]} is the same for every trial and cannot be swept"
    model: Any = JobSpec
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "the job"
            known = ", ".join(sorted(fields)) if fields else "nothing (it is a value)"
            return f"{where} has no key {part!r} (it has: {known})"
        model = fields[part].annotation
        if i < len(parts) - 1 and not hasattr(model, "model_fields"):
            return f"{'.'.join(parts[:i + 1])} is a value, not a section"
    if hasattr(model, "model_fields"):
        return f"{key} is a section; name one of its keys ({', '.join(sorted(model.model_fields))})"
    return None


def objective_value(sweep: SweepSpec, summary: dict[str, Any]) -> float:
    """The number a trial reports: ``metric``, or the weighted sum in ``objective``, from the trial's summary
    values (evaluate's over train's). Raises KeyError naming what is missing and what is there."""
    weights = sweep.objective or {sweep.metric: 1.0}
    missing = [k for k in weights if not isinstance(summary.get(k), (int, float)) or summary.get(k) is None]
    if missing:
        have = ", ".join(sorted(k for k, v in summary.items() if isinstance(v, (int, float))
                                and not isinstance(v, bool)))
        raise KeyError(f"the trial reported no {', '.join(missing)} (numbers it reported: {have})")
    return float(sum(w * float(summary[k]) for k, w in weights.items()))


def intermediate_value(direction: str, eval_loss: float) -> float:
    """What a train stage reports for pruning: the eval loss, negated when the study maximizes (lower loss is
    better in both cases, and the pruner compares in the study's direction)."""
    return -eval_loss if direction == "maximize" else eval_loss
