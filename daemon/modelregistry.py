"""The model registry: one versioned entry per trained model in the store's ``models`` table.

Torch-free. The daemon (the store's only writer) calls ``ensure_entry`` / ``update_entry``; the CLI reads
through ``Store.for_home(home, readonly=True)`` for ``trainbox models`` and ``trainbox compare A B``.
"""
from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from daemon.cli import print_json
from daemon.jobs import JobRecord, utcnow
from daemon.store import Store
from trainbox.protocol import EXIT_INVALID, EXIT_OK, AugmentSummary

log = logging.getLogger(__name__)
JSON_SCHEMA_VERSION = 1
REF_PATTERN = re.compile(r"^(?P<name>.+?)(?:(?::|@v?)(?P<version>\d+))?$")


class UnknownModel(LookupError):
    """A model reference that matches no registry entry."""


# entries ---------------------------------------------------------------------------------------------
def _stage_summary(job: JobRecord, name: str) -> dict[str, Any] | None:
    stage = job.stage_named(name)
    return stage.summary if stage is not None else None


def _count(value: Any) -> int | None:
    """A row count from a summary value: an int, or a dict of per-split counts (summed)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        counts = [v for v in value.values() if isinstance(v, int) and not isinstance(v, bool)]
        return sum(counts) if counts else None
    return None


def rows_of(job: JobRecord, datasets: list[dict[str, Any]]) -> dict[str, int | None]:
    """Original rows (prepare's splits together) and the same after augmentation added rows to the train split
    (None without augment)."""
    prepare = _stage_summary(job, "prepare") or {}
    original = _count(prepare.get("rows"))
    if original is None:  # before prepare ran: what the store knows about the datasets
        original = sum(int(d.get("rows") or 0) for d in datasets) or None
    augment = _stage_summary(job, "augment")
    generated = AugmentSummary.model_validate(augment).rows_generated if augment else None
    augmented = original + generated if original is not None and generated is not None else None
    return {"original": original, "augmented": augmented}


def _train_loss(job: JobRecord) -> float | None:
    summary = _stage_summary(job, "train") or {}
    for key in ("train_loss", "final_loss", "loss"):
        if isinstance(summary.get(key), (int, float)):
            return float(summary[key])
    return None


def _dataset_docs(store: Store, job: JobRecord) -> list[dict[str, Any]]:
    docs = []
    for sha in job.datasets:
        found = store.dataset(sha) or {}
        docs.append({"sha256": sha, "name": found.get("name"), "rows": found.get("rows"),
                     "format": found.get("format")})
    return docs


def entry_for_job(store: Store, job_id: str) -> dict[str, Any] | None:
    return store.model_of_job(job_id)


def ensure_entry(store: Store, job: JobRecord) -> dict[str, Any]:
    """The registry entry of ``job``'s model, created (next version of the job's name) on first call."""
    existing = entry_for_job(store, job.id)
    if existing is not None:
        return existing
    datasets = _dataset_docs(store, job)
    entry = store.add_model({
        "name": job.name,
        "job_id": job.id,
        "base_model": job.spec.base_model,
        "datasets": datasets,
        "rows": rows_of(job, datasets),
        "train_loss": _train_loss(job),
        "metrics": {},
        "winner": None,
        "artifacts": {},
        "sweep": job.sweep,  # the sweep whose best trial this model is (then: train_best)
        "created_at": utcnow(),
        "updated_at": utcnow(),
    })
    log.info("registered model %s version %d (job %s)", job.name, entry["version"], job.id)
    return entry


def update_entry(store: Store, job_id: str, stage: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Merge a stage's registry fields into the entry: ``metrics`` and ``artifacts`` (the paths its
    ``StageResult.model_artifacts`` named) merge, other keys are set. Row counts and train loss are refreshed
    from the job record."""
    if entry_for_job(store, job_id) is None:
        job = store.job(job_id)
        if job is None:
            raise KeyError(f"no registry entry and no job {job_id}")
        ensure_entry(store, job)

    def merge(entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        for key, value in (fields or {}).items():
            if key in ("metrics", "artifacts") and isinstance(value, dict):
                entry[key] = {**(entry.get(key) or {}), **value}
            else:
                entry[key] = value
        job = store.job(job_id)
        if job is not None:
            rows = rows_of(job, entry.get("datasets", []))
            entry["rows"] = {k: rows[k] if rows[k] is not None else (entry.get("rows") or {}).get(k)
                             for k in ("original", "augmented")}
            if entry.get("train_loss") is None:
                entry["train_loss"] = _train_loss(job)
        entry.setdefault("stages", [])
        if stage not in entry["stages"]:
            entry["stages"] = [*entry["stages"], stage]
        entry["updated_at"] = utcnow()
        return entry
    return store.update_model(job_id, merge)


def all_entries(store: Store) -> list[dict[str, Any]]:
    return store.all_models()


def previous_version(store: Store, name: str, version: int) -> dict[str, Any] | None:
    """The newest entry of ``name`` with a version below ``version`` (the A/B's previous model)."""
    older = [e for e in store.models_named(name) if e["version"] < version]
    return max(older, key=lambda e: e["version"]) if older else None


def find_entry(store: Store, ref: str) -> dict[str, Any]:
    """``name`` (latest), ``name:3``, ``name@v3``/``name@3``, or a job id; raises UnknownModel."""
    by_job = entry_for_job(store, ref)
    if by_job is not None:
        return dict(by_job)
    match = REF_PATTERN.match(ref.strip())
    name, version = (match["name"], match["version"]) if match else (ref, None)
    candidates = store.models_named(name)
    if not candidates:
        known = sorted({e["name"] for e in store.all_models()})
        hint = f"; known models: {', '.join(known)}" if known else "; no model is registered yet"
        raise UnknownModel(f"no model named {name!r}{hint}")
    if version is None:
        return dict(max(candidates, key=lambda e: e["version"]))
    for entry in candidates:
        if entry["version"] == int(version):
            return dict(entry)
    have = ", ".join(str(v) for v in sorted(e["version"] for e in candidates))
    raise UnknownModel(f"{name} has no version {version} (versions: {have})")


# comparison ------------------------------------------------------------------------------------------
def total_rows(entry: dict[str, Any]) -> int | None:
    rows = entry.get("rows") or {}
    return rows.get("augmented") if rows.get("augmented") is not None else rows.get("original")


def _pct(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return (new - old) / abs(old) * 100.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_entries(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What changed from ``a`` to ``b``: metric deltas, train-loss reduction %, sample-count increase."""
    metrics_a, metrics_b = a.get("metrics") or {}, b.get("metrics") or {}
    metrics = {}
    for key in sorted(set(metrics_a) | set(metrics_b)):
        va, vb = metrics_a.get(key), metrics_b.get(key)
        if not (_number(va) or _number(vb)):
            continue
        delta = vb - va if _number(va) and _number(vb) else None
        metrics[key] = {"a": va, "b": vb, "delta": delta}
    loss_a, loss_b = a.get("train_loss"), b.get("train_loss")
    reduction = -_pct(loss_b, loss_a) if _pct(loss_b, loss_a) is not None else None
    rows_a, rows_b = total_rows(a), total_rows(b)
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "a": a,
        "b": b,
        "metrics": metrics,
        "train_loss": {"a": loss_a, "b": loss_b, "reduction_pct": reduction},
        "rows": {"a": rows_a, "b": rows_b,
                 "increase": rows_b - rows_a if rows_a is not None and rows_b is not None else None,
                 "increase_pct": _pct(rows_b, rows_a)},
        "winner": {"a": a.get("winner"), "b": b.get("winner")},
    }


# commands --------------------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="list registered model versions and their results")
    p.add_argument("--json", action="store_true", help="machine-readable output (see README)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("compare", parents=[common], help="compare two model versions (B against A)")
    p.add_argument("a", help="model ref: NAME (latest), NAME:3, NAME@v3, or a job id")
    p.add_argument("b", help="model ref, as A")
    p.add_argument("--json", action="store_true", help="machine-readable output (see README)")
    p.set_defaults(func=cmd_compare)


def _read_store(args: argparse.Namespace) -> Store:
    from daemon.config import resolve_home

    return Store.for_home(resolve_home(args.home), readonly=True)


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.cli import console
    from daemon.modeltables import models_table

    entries = all_entries(_read_store(args))
    if args.json:
        print_json({"schema_version": JSON_SCHEMA_VERSION, "models": entries})
    else:
        console.print(models_table(entries))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from daemon.cli import console, err_console
    from daemon.modeltables import comparison_panel

    store = _read_store(args)
    try:
        a, b = find_entry(store, args.a), find_entry(store, args.b)
    except UnknownModel as exc:
        err_console.print(f"[bold red]error:[/] {exc}; 'trainbox models' lists them", highlight=False)
        return EXIT_INVALID
    result = compare_entries(a, b)
    if args.json:
        print_json(result)
    else:
        console.print(comparison_panel(result))
    return EXIT_OK
