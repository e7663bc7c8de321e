"""The service stop path (shared with SIGTERM): a running stage checkpoints, the daemon exits, the lock is free."""
from __future__ import annotations

import json
import re
import logging
import os
import sys
import threading

import pytest

from conftest import drop, read_store, wait_for
from daemon import winservice
from daemon.lock import lock_is_held
from daemon.service import ServiceError

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"
JOB = "name: svc\ndatasets: pc.jsonl\nstages: [prepare, train]\ntrain:\n  max_steps: 5000\n  batch_size: 2\n"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


@pytest.mark.slow
def test_service_stop_checkpoints_the_running_stage_and_releases_the_lock(home, restore_logging):
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(winservice.run_service(home)), daemon=True)
    thread.start()  # as the Windows service does: the daemon on a thread that is not the main one
    wait_for(lambda: (read_store(home).get_meta("daemon") or {}).get("pid") == os.getpid(), 30, "heartbeat")
    drop(home / "inbox", "pc.jsonl", (FIXTURES / "prompt_completion.jsonl").read_text())
    drop(home / "inbox", "svc.yaml", JOB)

    def training() -> dict | None:
        jobs = read_store(home).all_jobs()
        progress = home / "jobs" / jobs[0].id / "train" / "progress.json" if jobs else None
        return jobs[0] if progress and progress.exists() else None
    job = wait_for(training, 120, "the train stage to report progress")

    winservice.stop_service()
    thread.join(120)
    assert not thread.is_alive() and result == [0]
    assert not lock_is_held(home)
    stored = read_store(home).job(job.id)
    assert stored.state == "interrupted", stored
    train_dir = home / "jobs" / job.id / "train"
    manifests = [json.loads(p.read_text()) for p in train_dir.rglob("manifest.json")]
    stopped_at = int(re.search(r"stopped at step (\d+)/", (train_dir / "stage.log").read_text()).group(1))
    # the stop saved the last trained step: as an emergency checkpoint, or by reusing an epoch-end one
    # written at that same step a moment earlier
    assert any(m["step"] == stopped_at and m["kind"] in ("emergency", "epoch") for m in manifests), manifests
    assert "trainbox stopped" in (home / "logs" / "daemon.log").read_text()


def test_winservice_imports_without_pywin32_and_says_how_to_get_it(tmp_path):
    if winservice.win32serviceutil is not None:
        pytest.skip("pywin32 is installed here")
    with pytest.raises(ServiceError, match="pip install"):
        winservice.install(tmp_path, "trainbox", None)
    assert "trainbox" in winservice.describe(tmp_path, "trainbox")


@pytest.mark.skipif(sys.platform != "win32", reason="the pywin32 service class exists only on Windows")
def test_windows_service_class_routes_stop_to_request_stop():
    if winservice.win32serviceutil is None:
        pytest.skip("pywin32 is not installed")
    cls = winservice.TrainboxService
    assert callable(cls.SvcDoRun) and callable(cls.SvcStop)
    assert "winservice.TrainboxService" in winservice.win32serviceutil.GetServiceClassString(cls)
