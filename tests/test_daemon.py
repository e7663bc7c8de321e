"""The daemon as users run it: a real process, a real watchdog observer, real signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import FAST_SETTINGS, FIXTURES, REPO, drop, jobs_json, read_store, wait_for
from daemon.layout import Layout
from daemon.status import rejected_files


def set_settings(home: Path, **changes: dict) -> None:
    settings = json.loads(json.dumps(FAST_SETTINGS))
    for key, value in changes.items():
        settings[key] = {**settings.get(key, {}), **value}
    (home / "daemon.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_dataset_and_job_dropped_together_make_one_job(home: Path, daemon_factory) -> None:
    d = daemon_factory().wait_ready()
    drop(home / "inbox", "safety.jsonl", (FIXTURES / "safety_think.jsonl").read_text())
    drop(home / "inbox", "job.yaml", "name: together\ndatasets: [safety]\nstages: [prepare]\n")
    job = wait_for(lambda: [j for j in jobs_json(home) if j["state"] == "succeeded"], 30, "job done")[0]
    time.sleep(1.0)  # past the default-job window: still one job
    jobs = jobs_json(home)
    assert len(jobs) == 1 and jobs[0]["name"] == "together"
    prepare = job["stages"][0]
    assert prepare["state"] == "succeeded" and sum(prepare["summary"]["rows"].values()) == 12
    assert Path(prepare["artifacts"]["train"]).is_file()
    for key in ("id", "name", "state", "stage", "stages", "progress", "error", "created_at", "updated_at"):
        assert key in job
    assert d.stop() == 0


def test_slow_writer_is_not_read_before_it_finishes(home: Path, daemon_factory) -> None:
    daemon_factory().wait_ready()
    rows = (FIXTURES / "text.jsonl").read_text().splitlines(keepends=True)
    with open(home / "inbox" / "slow.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row[: len(row) // 2])  # half a line: invalid JSON if read now
            fh.flush()
            time.sleep(0.45)  # longer than the 0.3 s stability window
            fh.write(row[len(row) // 2:])
            fh.flush()
        assert not read_store(home).all_datasets() and not rejected_files(Layout(home))
    ds = wait_for(lambda: read_store(home).all_datasets(), 10, "slow file ingested")
    assert ds[0]["rows"] == len(rows)


def test_many_files_at_once_are_each_ingested_exactly_once(home: Path, daemon_factory) -> None:
    set_settings(home, default_job={"enabled": False})
    inbox = home / "inbox"
    for i in range(500):  # written while no daemon runs, then found by the start-up scan
        drop(inbox, f"d{i:03d}.jsonl", json.dumps({"text": f"row {i}"}) + "\n")
    daemon_factory().wait_ready()
    wait_for(lambda: read_store(home).dataset_count() == 500, 120, "500 datasets")
    assert not list(inbox.iterdir()) and not rejected_files(Layout(home))
    assert sorted(d["name"] for d in read_store(home).all_datasets()) == [f"d{i:03d}.jsonl" for i in range(500)]


def test_sigkill_during_ingest_loses_and_duplicates_nothing(home: Path, daemon_factory) -> None:
    set_settings(home, default_job={"enabled": False})
    inbox = home / "inbox"
    for i in range(300):
        drop(inbox, f"k{i:03d}.jsonl", json.dumps({"text": f"kill test {i}"}) + "\n")
    drop(inbox, "broken.jsonl", "not json\n")
    d = daemon_factory().wait_ready()
    wait_for(lambda: read_store(home).dataset_count() >= 30, 60, "ingest under way")
    d.kill()
    assert read_store(home).dataset_count() < 300, "killed before the end"
    daemon_factory().wait_ready()
    wait_for(lambda: read_store(home).dataset_count() == 300 and not list(inbox.iterdir()), 120, "all ingested")
    store = read_store(home)
    assert sorted(d["name"] for d in store.all_datasets()) == [f"k{i:03d}.jsonl" for i in range(300)]
    for ds in store.all_datasets():
        assert (home / ds["path"]).is_file()
    assert [r["file"] for r in rejected_files(Layout(home))] == ["broken.jsonl"]
    assert not list(Layout(home).ingesting.iterdir())


def test_second_daemon_on_the_same_home_refuses(home: Path, daemon_factory) -> None:
    first = daemon_factory().wait_ready()
    second = cli(home, "run")
    assert second.returncode == 2
    assert f"another trainbox daemon (pid {first.proc.pid}) is already running" in second.stderr
    assert first.proc.poll() is None


def test_crashing_stage_fails_its_job_and_the_daemon_goes_on(home: Path, daemon_factory) -> None:
    set_settings(home, concurrency={"cpu_jobs": 0})  # accept the job, but run nothing yet
    d = daemon_factory().wait_ready()
    drop(home / "inbox", "job.yaml", "name: doomed\ndatasets: [data]\nstages: [prepare]\n")
    drop(home / "inbox", "data.jsonl", (FIXTURES / "text.jsonl").read_text())
    wait_for(lambda: [j for j in jobs_json(home) if j["state"] == "queued"], 10, "job queued")
    assert d.stop() == 0
    # the dataset's stored file vanishes before the stage reads it: a real crash (FileNotFoundError)
    (home / read_store(home).all_datasets()[0]["path"]).unlink()
    set_settings(home, concurrency={"cpu_jobs": 1})
    daemon_factory().wait_ready()
    failed = wait_for(lambda: [j for j in jobs_json(home) if j["state"] == "failed"], 30, "failure")[0]
    assert "stage prepare exited with code 1" in failed["error"]
    assert "FileNotFoundError" in failed["error"], "the error carries the tail of the stage log"
    drop(home / "inbox", "ok.jsonl", (FIXTURES / "alpaca.jsonl").read_text())
    wait_for(lambda: any(j["state"] == "succeeded" for j in jobs_json(home)), 30, "next job runs")


def test_status_json_shows_daemon_and_rejected_files(home: Path, daemon_factory) -> None:
    d = daemon_factory().wait_ready()
    drop(home / "inbox", "oops.yaml", "name: [\n")
    wait_for(lambda: rejected_files(Layout(home)), 10, "rejection")
    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["daemon"]["alive"] and status["daemon"]["pid"] == d.proc.pid
    assert status["rejected"][0]["file"] == "oops.yaml"
    assert "YAML syntax error" in status["rejected"][0]["reason"]
    d.stop()
    assert json.loads(cli(home, "status", "--json").stdout)["daemon"]["alive"] is False


def test_cancel_and_retry_through_the_running_daemon(home: Path, daemon_factory) -> None:
    daemon_factory().wait_ready()
    drop(home / "inbox", "w.yaml", "name: waits\ndatasets: [nothing_yet]\nstages: [prepare]\n")
    job = wait_for(lambda: jobs_json(home), 10, "job")[0]
    assert job["state"] == "waiting" and job["dataset_patterns"] == ["nothing_yet"]
    assert "waiting for a dataset matching: nothing_yet" in cli(home, "show", "waits").stdout
    assert cli(home, "cancel", job["id"]).returncode == 0
    wait_for(lambda: jobs_json(home)[0]["state"] == "cancelled", 10, "cancelled")
    again = cli(home, "cancel", "waits")
    assert again.returncode == 2 and "only waiting, queued, running or interrupted" in again.stderr
    assert cli(home, "retry", "waits").returncode == 0
    wait_for(lambda: jobs_json(home)[0]["state"] == "waiting", 10, "waiting again")
    drop(home / "inbox", "nothing_yet.jsonl", (FIXTURES / "text.jsonl").read_text())
    wait_for(lambda: jobs_json(home)[0]["state"] == "succeeded", 30, "ran after retry")


def test_submit_and_once_mode(home: Path, tmp_path: Path) -> None:
    job = tmp_path / "j.yaml"
    job.write_text("name: once\ndatasets: [messages]\nstages: [prepare]\n")
    out = cli(home, "submit", str(FIXTURES / "messages.jsonl"), str(job))
    assert out.returncode == 0 and "no daemon is running" in out.stdout
    run = cli(home, "run", "--once")
    assert run.returncode == 0, run.stderr
    (only,) = jobs_json(home)
    assert only["state"] == "succeeded"
    shown = json.loads(cli(home, "show", "once", "--json").stdout)["job"]
    assert shown["id"] == only["id"] and shown["stages"][0]["summary"]["format"] == "messages"


def test_writer_that_started_before_the_daemon_is_waited_for(home: Path, daemon_factory) -> None:
    with open(home / "inbox" / "early.jsonl", "w", encoding="utf-8") as fh:
        fh.write('{"text": "first row"}\n{"text": "second')
        fh.flush()
        daemon_factory().wait_ready()
        time.sleep(1.5)  # five stability windows: stable size alone would have taken it
        assert not read_store(home).all_datasets() and not rejected_files(Layout(home))
        fh.write(' row"}\n')
    ds = wait_for(lambda: read_store(home).all_datasets(), 10, "file ingested after close")
    assert ds[0]["rows"] == 2


TRAIN_JOB = """name: stoppable
datasets: [safety]
stages: [prepare, train]
train:
  max_steps: 600
  batch_size: 2
  max_seq_length: 64
  learning_rate: 0.01
  checkpoint: {interval_seconds: 0.5, keep: 2}
  progress_log: {interval_seconds: 1}
"""


def test_sigterm_while_a_stage_runs_interrupts_and_a_restart_completes(home: Path, daemon_factory) -> None:
    d = daemon_factory().wait_ready()
    drop(home / "inbox", "safety.jsonl", (FIXTURES / "safety_think.jsonl").read_text())
    drop(home / "inbox", "job.yaml", TRAIN_JOB)

    def training() -> bool:  # read the stage's own progress file: the store lags by up to 2 s
        progress = [json.loads(p.read_text()) for p in (home / "jobs").glob("*/train/progress.json")]
        return bool(progress) and (progress[0].get("step") or 0) >= 3
    wait_for(training, 120, "training under way")
    d.signal(signal.SIGTERM)
    assert d.stop() == 0
    (job,) = jobs_json(home)
    assert job["state"] == "interrupted" and job["stages"][1]["state"] == "interrupted"
    stage_log = (home / "jobs" / job["id"] / "train" / "stage.log").read_text()
    assert "signal 15: stopping after the current step" in stage_log, "the child itself got the signal"
    assert job["progress"]["step"] < 600

    daemon_factory("--once").proc.wait(timeout=300)
    (job,) = jobs_json(home)
    assert job["state"] == "succeeded", job["error"]
    train = job["stages"][1]["summary"]
    assert train["total_steps"] == 600 and train["resumed_from_step"] >= 3


def test_file_moved_in_from_another_folder_is_ingested(home: Path, daemon_factory, tmp_path: Path) -> None:
    daemon_factory().wait_ready()
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((FIXTURES / "text.jsonl").read_text())
    os.replace(outside, home / "inbox" / "moved.jsonl")  # inotify sees a create, never a close
    ds = wait_for(lambda: read_store(home).all_datasets(), 10, "moved-in file ingested")
    assert ds[0]["name"] == "moved.jsonl"


def test_a_default_job_typo_stops_the_start_with_the_fix(home: Path) -> None:
    set_settings(home, default_job={"job": {"train": {"max_stpes": 3}}})
    out = cli(home, "run", "--once")
    assert out.returncode == 2
    assert "default_job.job.train.max_stpes: is not a field" in out.stderr and "Traceback" not in out.stderr


def test_once_finishes_despite_fifos_and_links_in_the_inbox_and_in_claims(home: Path) -> None:
    os.mkfifo(home / "inbox" / "pipe.jsonl")
    (home / "inbox" / "zero.jsonl").symlink_to("/dev/zero")
    (home / "inbox" / "gone.jsonl").symlink_to(home / "nowhere")
    os.mkfifo(Layout(home).ingesting / "20260101000000-abcdef12__claimed.jsonl")  # left by a crash
    drop(home / "inbox", "good.jsonl", (FIXTURES / "text.jsonl").read_text())
    run = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(home)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(r["file"] for r in rejected_files(Layout(home))) == [
        "claimed.jsonl", "gone.jsonl", "pipe.jsonl", "zero.jsonl"]
    assert [d["name"] for d in read_store(home).all_datasets()] == ["good.jsonl"]


def test_a_large_dataset_is_checked_while_the_loop_goes_on(home: Path, daemon_factory) -> None:
    set_settings(home, default_job={"enabled": False})
    daemon_factory().wait_ready()
    rows = "".join(json.dumps({"prompt": f"question {i} " + "q" * 200, "completion": "answer " + "a" * 80}) + "\n"
                   for i in range(100_000))
    drop(home / "inbox", "big.jsonl", rows)  # ~33 MB: seconds of validation
    wait_for(lambda: list(Layout(home).ingesting.iterdir()), 10, "big.jsonl claimed")
    drop(home / "inbox", "meanwhile.yaml", "name: meanwhile\ndatasets: [later]\nstages: [prepare]\n")
    wait_for(lambda: read_store(home).all_jobs(), 10, "the job taken while big.jsonl is checked")
    assert not read_store(home).all_datasets(), "the job did not wait for the dataset's validation"
    ds = wait_for(lambda: read_store(home).all_datasets(), 120, "big.jsonl stored")
    assert ds[0]["rows"] == 100_000


def test_show_says_why_a_job_cannot_start(home: Path, daemon_factory) -> None:
    daemon_factory().wait_ready()
    drop(home / "inbox", "j.yaml", "name: j\ndatasets: [prefs]\nstages: [prepare]\n")
    drop(home / "inbox", "prefs.jsonl", '{"conversations": [{"from": "human", "value": "q"}], '
                                        '"chosen": {"from": "gpt", "value": "a"}, "rejected": {}}\n')
    job = wait_for(lambda: [j for j in jobs_json(home) if j["error"]], 15, "the job's explanation")[0]
    assert job["state"] == "waiting" and "prefs.jsonl was rejected: 1 bad line(s); nothing was imported" in job["error"]
    shown = cli(home, "show", "j").stdout
    assert "prefs.jsonl was rejected" in shown and "prefs.jsonl.error.txt" in shown
