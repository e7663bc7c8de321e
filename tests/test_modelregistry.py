"""daemon.modelregistry: versioned model entries in a real TinyDB store, and the models / compare commands."""
from __future__ import annotations

import argparse
import json

import pytest

from daemon import modelregistry as registry
from daemon.jobs import JobRecord, ModelRef, StageRecord, new_job
from daemon.store import Store
from trainbox.jobspec import JobSpec


def _job(job_id: str, name: str = "guard", rows: dict | None = None, augmented: int | None = None,
         train_loss: float | None = None) -> JobRecord:
    stages = [StageRecord(name="prepare", summary={"format": "classification",
                                                   "rows": rows or {"train": 80, "val": 10, "test": 10}})]
    if augmented is not None:
        train = (rows or {"train": 80})["train"]  # augmented: all rows after augment grew the train split
        generated = augmented - sum((rows or {"train": 80, "val": 10, "test": 10}).values())
        stages.append(StageRecord(name="augment", summary={"rows_original": train, "rows_generated": generated,
                                                           "rows_total": train + generated}))
    stages.append(StageRecord(name="train", summary={"train_loss": train_loss} if train_loss is not None else {}))
    job = new_job(JobSpec(name=name, datasets=["guard.jsonl"], base_model="builtin:tiny"), source="test", claim=None)
    return job.model_copy(update={"id": job_id, "datasets": ["abc123"], "stages": stages})


@pytest.fixture()
def store(tmp_path):
    s = Store.for_home(tmp_path)
    s.insert_dataset({"sha256": "abc123", "name": "guard.jsonl", "rows": 100, "format": "classification",
                       "ingested_at": "2026-01-01T00:00:00+00:00"})
    return s


def _register(store: Store, job: JobRecord, loss: float, metrics: dict, winner: bool) -> dict:
    store.insert_job(job)
    registry.ensure_entry(store, job)
    registry.update_entry(store, job.id, "train", {"train_loss": loss,
                                                   "artifacts": {"adapter": f"/jobs/{job.id}/adapter"}})
    return registry.update_entry(store, job.id, "evaluate", {"metrics": metrics, "winner": winner,
                                                             "temperature": 1.7,
                                                             "artifacts": {"eval_report": "/r/report.html"}})


def test_entries_are_versioned_per_name_and_idempotent_per_job(store):
    first = registry.ensure_entry(store, _job("j1"))
    again = registry.ensure_entry(store, _job("j1"))
    second = registry.ensure_entry(store, _job("j2"))
    other = registry.ensure_entry(store, _job("j3", name="other"))
    assert (first["version"], again["version"], second["version"], other["version"]) == (1, 1, 2, 1)
    assert len(store.all_models()) == 3
    assert first["datasets"] == [{"sha256": "abc123", "name": "guard.jsonl", "rows": 100,
                                  "format": "classification"}]
    assert first["rows"] == {"original": 100, "augmented": None}
    assert first["base_model"] == "builtin:tiny" and first["winner"] is None and first["metrics"] == {}
    assert registry.previous_version(store, "guard", 2)["job_id"] == "j1"
    assert registry.previous_version(store, "guard", 1) is None
    assert registry.previous_version(store, "other", 5)["version"] == 1


def test_update_merges_stage_fields_and_refreshes_rows(store):
    job = _job("j1", augmented=250)
    store.insert_job(job)
    registry.ensure_entry(store, job)
    registry.update_entry(store, "j1", "train", {"train_loss": 0.42, "artifacts": {"adapter": "/a"}})
    registry.update_entry(store, "j1", "evaluate", {"metrics": {"accuracy": 0.9}, "winner": True,
                                                    "temperature": 1.5, "artifacts": {"eval_report": "/r.html"}})
    entry = registry.update_entry(store, "j1", "export", {"artifacts": {"gguf": ["/m.gguf"]}})
    assert entry["train_loss"] == 0.42 and entry["winner"] is True and entry["temperature"] == 1.5
    assert entry["metrics"] == {"accuracy": 0.9}
    assert entry["artifacts"] == {"adapter": "/a", "eval_report": "/r.html", "gguf": ["/m.gguf"]}
    assert entry["rows"] == {"original": 100, "augmented": 250}
    assert entry["stages"] == ["train", "evaluate", "export"]
    reread = Store.for_home(store.path.parent.parent, readonly=True)
    assert registry.find_entry(reread, "guard")["artifacts"]["adapter"] == "/a"


def test_refs_and_comparison_numbers(store):
    _register(store, _job("j1", rows={"train": 80, "val": 10, "test": 10}), 0.8,
              {"accuracy": 0.70, "macro_f1": 0.60, "ece": 0.20}, False)
    _register(store, _job("j2", augmented=300), 0.6, {"accuracy": 0.85, "macro_f1": 0.80, "ece": 0.10}, True)
    assert registry.find_entry(store, "guard")["version"] == 2
    assert registry.find_entry(store, "guard:1")["job_id"] == "j1"
    assert registry.find_entry(store, "guard@v2")["job_id"] == "j2"
    assert registry.find_entry(store, "guard@1")["job_id"] == "j1"
    assert registry.find_entry(store, "j2")["version"] == 2
    with pytest.raises(registry.UnknownModel, match="versions: 1, 2"):
        registry.find_entry(store, "guard:7")
    with pytest.raises(registry.UnknownModel, match="known models: guard"):
        registry.find_entry(store, "nope")
    result = registry.compare_entries(registry.find_entry(store, "guard:1"), registry.find_entry(store, "guard:2"))
    assert result["metrics"]["accuracy"]["delta"] == pytest.approx(0.15)
    assert result["metrics"]["ece"]["delta"] == pytest.approx(-0.10)
    assert result["train_loss"]["reduction_pct"] == pytest.approx(25.0)
    assert result["rows"] == {"a": 100, "b": 300, "increase": 200, "increase_pct": pytest.approx(200.0)}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home")
    common.add_argument("-v", "--verbose", action="store_true")
    registry.add_commands(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(argv)
    return args.func(args)


def test_models_and_compare_commands(store, tmp_path, capsys):
    _register(store, _job("j1"), 0.8, {"accuracy": 0.70, "macro_f1": 0.60}, False)
    _register(store, _job("j2", augmented=300), 0.6, {"accuracy": 0.85, "macro_f1": 0.80}, True)
    home = str(tmp_path)

    assert _run(["models", "--home", home, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["schema_version"] == 1
    assert [(m["name"], m["version"], m["winner"]) for m in listed["models"]] == [("guard", 1, False),
                                                                               ("guard", 2, True)]

    assert _run(["compare", "guard:1", "guard@v2", "--home", home, "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["schema_version"] == 1
    assert compared["metrics"]["macro_f1"]["delta"] == pytest.approx(0.20)
    assert compared["train_loss"]["reduction_pct"] == pytest.approx(25.0)
    assert compared["rows"]["increase"] == 200

    assert _run(["models", "--home", home]) == 0
    out = capsys.readouterr().out
    assert "guard:1" in out and "guard:2" in out and "100 -> 300" in out

    assert _run(["compare", "guard:1", "guard", "--home", home]) == 0
    out = capsys.readouterr().out
    assert "+0.1500" in out and "25.0% lower" in out and "+200 (+200.0%)" in out

    assert _run(["compare", "guard:1", "missing", "--home", home]) == 2
    assert "no model named 'missing'" in capsys.readouterr().err


# publishing -------------------------------------------------------------------------------------------
def _export_job(store: Store) -> JobRecord:
    job = new_job(JobSpec.model_validate({"name": "guard", "datasets": ["guard.jsonl"], "stages": ["export"]}),
                  source="test", claim=None)
    job.datasets = ["abc123"]
    job.move_to("queued")
    for stage in job.stages:  # prepare is always added before export
        stage.move_to("running")
        if stage.name != "export":
            stage.move_to("succeeded")
    job.move_to("running")
    store.insert_job(job)
    return job


def _exported_and_exited(layout, job_id: str, gguf: bytes):
    """What the export stage leaves when it exits 0: model/ with its files and result.json; a real exited child."""
    import subprocess
    import sys

    from daemon.supervisor import Running

    stage_dir = layout.stage_dir(job_id, "export")
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "model" / "model-q8_0.gguf").write_bytes(gguf)
    (stage_dir / "model" / "Modelfile").write_text("FROM ./model-q8_0.gguf\n")
    (stage_dir / "result.json").write_text(json.dumps({
        "state": "succeeded", "summary": {}, "message": "exported guard v1",
        "artifacts": {"model_dir": "model", "gguf_q8_0": "model/model-q8_0.gguf", "modelfile": "model/Modelfile"},
        "model": {"artifacts": {"modelfile": "Modelfile"}, "gguf": ["model-q8_0.gguf"]},
        "model_artifacts": {"model_dir": "model_dir", "gguf_q8_0": "gguf_q8_0", "modelfile": "modelfile"},
        "publish": "model_dir"}))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=60) == 0
    return Running(job_id, 1, "export", ["cpu"], proc, stage_dir)


def _supervisor(home):
    from daemon.config import DaemonSettings
    from daemon.layout import Layout
    from daemon.supervisor import Supervisor

    layout = Layout(home)
    layout.create()
    store = Store.for_home(home)
    return Supervisor(layout, store, DaemonSettings(), [], lambda *a, **k: None), layout, store


def _collect(supervisor, run) -> None:
    """The supervisor's tick seeing the stage's exit."""
    supervisor.running[run.job_id] = run
    supervisor._poll(run)
    assert run.job_id not in supervisor.running


def test_a_kill_while_publishing_then_the_rerun_replaces_its_own_v1(tmp_path):
    supervisor, layout, store = _supervisor(tmp_path)
    job = _export_job(store)
    # _stage_done's first store writes (registry entry, job.model), then the kill lands after the move
    entry = registry.ensure_entry(store, job)
    store.set_job_fields(job.id, model=ModelRef(name="guard", version=entry["version"]))
    before_move = (tmp_path / "state" / "trainbox.json").read_bytes()
    run = _exported_and_exited(layout, job.id, b"first attempt")
    _collect(supervisor, run)
    assert (layout.models / "guard" / "v1" / "model-q8_0.gguf").read_bytes() == b"first attempt"
    (tmp_path / "state" / "trainbox.json").write_bytes(before_move)  # the store write the kill prevented

    supervisor, layout, store = _supervisor(tmp_path)  # the restarted daemon
    supervisor.recover()
    assert [s.state for s in store.job(job.id).stages] == ["succeeded", "pending"]
    run = _exported_and_exited(layout, job.id, b"second attempt")  # export ran again
    store.stage_started(job.id, run.index, pid=run.proc.pid, device=",".join(run.slots))  # as _start_stage records it
    _collect(supervisor, run)

    assert sorted(p.name for p in (layout.models / "guard").iterdir()) == ["v1"]
    published = layout.models / "guard" / "v1"
    assert (published / "model-q8_0.gguf").read_bytes() == b"second attempt"
    assert json.loads((published / ".trainbox-published.json").read_text())["job_id"] == job.id
    done = store.job(job.id)
    assert done.state == "succeeded"
    assert done.stages[1].artifacts["modelfile"] == str(published / "Modelfile")
    entries = registry.all_entries(store)
    assert [(e["name"], e["version"]) for e in entries] == [("guard", 1)]
    assert entries[0]["artifacts"]["modelfile"] == str(published / "Modelfile")


@pytest.mark.parametrize("marker", [None, {"job_id": "someone-else"}])
def test_a_v1_folder_that_is_not_this_jobs_is_never_replaced(tmp_path, marker):
    supervisor, layout, store = _supervisor(tmp_path)
    theirs = layout.models / "guard" / "v1"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine, do not touch")
    if marker is not None:
        (theirs / ".trainbox-published.json").write_text(json.dumps(marker))
    job = _export_job(store)
    _collect(supervisor, _exported_and_exited(layout, job.id, b"new"))
    assert (theirs / "notes.txt").read_text() == "mine, do not touch"
    assert (layout.models / "guard" / f"v1-{job.id}" / "model-q8_0.gguf").read_bytes() == b"new"
    assert store.job(job.id).state == "succeeded"
