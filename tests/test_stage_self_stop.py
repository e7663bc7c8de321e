"""A stage that stops itself on a full disk (exit 75, nobody asked it to stop) is never failed: its job is
interrupted with the reason and resumed by the daemon on its own once there is space again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import FAST_SETTINGS, DaemonProcess, drop, fill_disk, mounted_tmpfs, read_store, wait_for
from daemon.layout import Layout

JOB = {"name": "full-disk", "datasets": ["rows.jsonl"], "base_model": "builtin:tiny", "stages": ["prepare"]}
ROWS = 2000  # about 400 kB: prepare's splits need that much again
MARGIN = 160 * 1024  # left free for the daemon's own small writes (store, logs, job.yaml, stage.json)


@pytest.fixture()
def home_on_a_small_disk(tmp_path: Path):
    """A home on its own 4 MB tmpfs (one filesystem, as trainbox's renames need)."""
    with mounted_tmpfs(tmp_path / "disk", 4) as disk:
        home = disk / "home"
        Layout(home).create()
        settings = {**FAST_SETTINGS, "supervisor": {**FAST_SETTINGS["supervisor"], "self_stop_resume_seconds": 1.0}}
        (home / "daemon.yaml").write_text(yaml.safe_dump(settings))
        yield disk, home


@pytest.mark.slow
def test_a_stage_that_finds_the_disk_full_is_interrupted_and_resumes_by_itself(home_on_a_small_disk):
    disk, home = home_on_a_small_disk
    data = "".join(json.dumps({"text": f"row {i}: " + "lorem ipsum " * 16}) + "\n" for i in range(ROWS)).encode()
    daemon = DaemonProcess(home).wait_ready()
    try:
        filler = fill_disk(disk, leave=len(data) + MARGIN)  # room for the dataset, not for its splits too
        drop(home / "inbox", "rows.jsonl", data)
        drop(home / "inbox", "job.yaml", yaml.safe_dump(JOB))

        def interrupted_event():
            return next((e for e in read_store(home).recent_events(200) if e["kind"] == "job_interrupted"), None)
        event = wait_for(interrupted_event, 90, "the job to be interrupted by the full disk")
        assert "stage prepare stopped itself and is resumable; trainbox resumes it in 1 s" in event["message"]
        store = read_store(home)
        job = store.all_jobs()[0]
        assert job.state != "failed" and not any(e["kind"] == "job_failed" for e in store.recent_events(200))
        assert "the disk is full" in (home / "jobs" / job.id / "prepare" / "stage.log").read_text()

        filler.unlink()  # space is back; nothing else is done by hand
        wait_for(lambda: read_store(home).job(job.id).state == "succeeded", 90, "the job to resume")
        job = read_store(home).job(job.id)
        assert job.stages[0].state == "succeeded" and job.error is None
        train = home / "jobs" / job.id / "prepare" / "splits" / "train.jsonl"
        assert len(train.read_text().splitlines()) > ROWS // 2
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
