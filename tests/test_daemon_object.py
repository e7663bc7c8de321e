"""daemon.app.Daemon driven step by step in this process: start, iterations, stop, against a real home
(real watchdog observer, store file, home lock and a real prepare stage child process)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.app import Daemon, request_stop
from daemon.config import load_settings
from daemon.lock import lock_is_held
from trainbox.errors import DaemonAlreadyRunning

from conftest import FIXTURES, read_store


def _iterate_until(daemon: Daemon, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.iteration(), "not in --once mode: an iteration never asks to end"
        value = predicate()
        if value:
            return value
        daemon.wake.wait(0.1)
        daemon.wake.clear()
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_start_iterate_stop_runs_a_dropped_job_and_releases_the_home(home: Path):
    daemon = Daemon(home, load_settings(home))
    daemon.start()
    try:
        assert lock_is_held(home)
        beat = read_store(home).get_meta("daemon")
        assert beat["home"] == str(home) and beat["pid"] is not None, "alive once the inbox is watched"
        with pytest.raises(DaemonAlreadyRunning, match="already running on home"):
            Daemon(home, load_settings(home)).start()

        (home / "inbox" / "notes.jsonl").write_bytes((FIXTURES / "text.jsonl").read_bytes())
        (home / "inbox" / "notes-job.yaml").write_text("name: notes\ndatasets: [notes]\nstages: [prepare]\n")
        job = _iterate_until(daemon, lambda: next(iter(read_store(home).jobs_in("succeeded")), None), 90,
                             "the dropped job to run its prepare stage")
        assert job.name == "notes" and [s.state for s in job.stages] == ["succeeded"]
        assert (home / "jobs" / job.id / "prepare" / "splits" / "train.jsonl").is_file()
        assert not list((home / "inbox").iterdir()) and not daemon.supervisor.running
    finally:
        daemon.stop()
    assert not lock_is_held(home)
    assert read_store(home).get_meta("daemon")["pid"] is None and read_store(home).get_meta("daemon")["stopped_at"]


def test_once_mode_ends_when_idle_and_request_stop_reaches_a_running_loop(home: Path):
    daemon = Daemon(home, load_settings(home), once=True)
    daemon.start()
    try:
        assert daemon.iteration() is False, "an empty home: nothing to do"
    finally:
        daemon.stop()

    stopped_early = Daemon(home, load_settings(home))
    stopped_early.request_stop()  # before run(): it starts, does no pass, stops and releases the home
    assert stopped_early.run() == 0 and not lock_is_held(home)
    looping = Daemon(home, load_settings(home))
    looping.start()
    try:
        request_stop()  # the path the Windows service and signals take
        assert looping.stopping.is_set() and looping.wake.is_set()
    finally:
        looping.stop()
    assert not lock_is_held(home)
