"""Status and live views rendered for a prepared store show every element, at 80 columns and narrower."""
from __future__ import annotations

import json

from rich.console import Console

from daemon.jobs import job_view
from daemon.status import status_view
from daemon.store import Store
from daemon.top import METRICS_FILE, MetricsTail, TopSource, render
from daemon.ui import duration, job_panel, jobs_table, sparkline, status_panel

from ui_fixtures import LOSSES, prepared_home  # noqa: F401 (pytest fixture)


def _text(renderable, width=80, height=None) -> str:
    console = Console(record=True, width=width, height=height or 500, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_live_frame_shows_every_element_in_80x24(prepared_home):
    snap = TopSource(prepared_home).snapshot()
    snap["gpus"] = [{"index": 0, "name": "NVIDIA H100", "utilization_percent": 87, "memory_used_mib": 41000,
                     "memory_total_mib": 81559, "temperature_c": 64}]
    out = _text(render(snap, 80, 24), 80, 24)
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= 23 and max(len(line) for line in lines) <= 80, out
    for expected in ("trainbox top", "running pid", "up ", "beat 0s ago", "watching inbox/", "/home  watching",
                     "running 1", "queued 1", "waiting 1", "failed 1", "succeeded 1",  # counts
                     "support-bot", "train 2/4", "12/40", "30%", "eta 1m35s", "512 tok/s",  # progress
                     "loss ", "1.4000 (min 1.4000)", "eval eval_loss 1.8  perplexity 6.05",
                     "queue ", "queued-job (queued)", "needs-data (waiting)",
                     "last eval ticket-router: accuracy 0.875  eval_loss 0.4123  macro_f1 0.8312",
                     "gpu0 NVIDIA H100  util 87%  mem 40.0/79.6 GiB  64C",
                     "events", "file_rejected", "job_failed",
                     "rejected files (1", "notes.jsonl", "line 1: not valid JSON"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert sparkline(LOSSES, 12) in out  # the loss curve, one block per step when it fits


def test_without_gpu_and_when_narrow(prepared_home):
    snap = TopSource(prepared_home).snapshot()
    snap["gpus"] = []
    out = _text(render(snap, 40, 24), 40, 24)
    lines = out.rstrip("\n").split("\n")
    assert max(len(line) for line in lines) <= 40 and len(lines) <= 23, out
    assert "gpu no GPU" in out and "support-bot" in out and "12/40" in out and "…" in out


def test_small_terminal_drops_events_before_jobs(prepared_home):
    snap = TopSource(prepared_home).snapshot()
    snap["gpus"] = []
    out = _text(render(snap, 80, 14), 80, 14)
    assert len(out.rstrip("\n").split("\n")) <= 13, out
    assert "support-bot" in out and "12/40" in out and "queue" in out


def test_metrics_tail_reads_new_lines_and_restarts_on_rewrite(prepared_home):
    source = TopSource(prepared_home)
    snap = source.snapshot()
    (job,) = [j for j in snap["jobs"] if j["state"] == "running"]
    path = prepared_home / "jobs" / job["id"] / METRICS_FILE
    tail = source.tails[job["id"]]
    assert tail.losses == LOSSES
    with open(path, "a") as fh:  # the torn line completes, one more row arrives
        fh.write('ss": 1.3}\n' + json.dumps({"step": 14, "loss": 1.25}) + "\n")
    source.snapshot()
    assert tail.losses == LOSSES + [1.3, 1.25]
    tmp = path.with_suffix(".tmp")  # a resume rewrites the file atomically from the checkpoint's history
    tmp.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    tmp.replace(path)
    source.snapshot()
    assert source.tails[job["id"]].losses == [9.0]
    path.unlink()
    fresh = MetricsTail(path)
    fresh.poll()
    assert fresh.losses == []


def test_one_shot_tables_share_the_components(prepared_home):
    store = Store.for_home(prepared_home, readonly=True)
    view = status_view(prepared_home, store)
    status = _text(status_panel(view))
    for expected in ("running pid", str(prepared_home), "running 1", "datasets 0", "rejected files (1)", "notes.jsonl",
                     "recent events", "ticket-router succeeded"):
        assert expected in status, status
    jobs = [job_view(j) for j in store.all_jobs()]
    table = _text(jobs_table(jobs), width=160)
    assert all(j["name"] in table for j in jobs) and "12/40" not in table  # store progress is not set
    done = next(j for j in jobs if j["name"] == "ticket-router")
    panel = _text(job_panel(done), width=120)
    assert "accuracy=0.875" in panel and "macro_f1=0.8312" in panel


def test_sparkline_and_duration():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline(range(100), 10) == "▁▂▃▃▄▅▆▆▇█"
    assert sparkline([2.0, 2.0], 5) == "▁▁" and sparkline([], 5) == ""
    assert [duration(s) for s in (5, 65, 3725, 2 * 86400 + 7200)] == ["5s", "1m05s", "1h02m", "2d02h"]


def test_the_loss_line_shows_each_term_of_a_multi_task_step():
    from daemon.ui import running_job

    job = {"name": "persona", "id": "j1", "device": "cpu", "stage": "train", "stages": [{"name": "train"}]}
    progress = {"step": 3, "total_steps": 10, "loss": 1.5, "loss_generation": 1.2, "loss_style": 1.4,
                "loss_relationship": None, "loss_contrastive": 0.61}
    out = _text(running_job(job, {"progress": progress, "losses": [1.9, 1.5]}, 120), 120)
    assert "1.5000 (min 1.5000)  gen 1.200 style 1.400 con 0.610" in out, out
    plain = _text(running_job(job, {"progress": {**progress, "loss_style": None, "loss_contrastive": None},
                                    "losses": [1.5]}, 120), 120)
    assert "gen " not in plain  # one term: the loss says it all


def test_a_distributed_stage_shows_one_line_per_rank_and_still_fits_80x24(prepared_home):
    snap = TopSource(prepared_home).snapshot()
    snap["gpus"] = []
    (job_id,) = snap["live"]
    ranks = [{"rank": r, "node_rank": 0, "device": f"cuda:{r}", "step": 12, "gpu_utilization_percent": 90 + r,
              "gpu_memory_used_mib": 20480, "process_cpu_percent": 100.0, "process_rss_mib": 3000, "pid": 100 + r}
             for r in range(4)]
    snap["live"][job_id]["progress"] = {**(snap["live"][job_id]["progress"] or {}), "step": 12, "total_steps": 40,
                                        "ranks": ranks}
    out = _text(render(snap, 80, 24), 80, 24)
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= 23, out
    for r in range(4):
        assert f"rank {r} node 0  cuda:{r}  step 12  gpu util {90 + r}%  mem 20.0 GiB" in out, out
    job = [j for j in snap["jobs"] if j["id"] == job_id][0]
    assert "rank 3" in _text(job_panel({**job, "progress": snap["live"][job_id]["progress"]}))
