"""Disk full while the daemon works: it keeps every file, keeps running, and catches up when space returns."""
from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import trainbox.fsio
from conftest import FIXTURES, read_store, wait_for
from daemon.app import request_stop, run_daemon
from daemon.config import load_settings
from daemon.layout import Layout
from daemon.status import rejected_files


def test_disk_full_during_ingest_loses_nothing_and_recovers(home: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="daemon")
    full = threading.Event()
    real_write = trainbox.fsio.write_bytes_atomically

    def write_unless_full(path, data):  # what a full disk does to every durable write
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)
    monkeypatch.setattr(trainbox.fsio, "write_bytes_atomically", write_unless_full)
    monkeypatch.setattr("daemon.app.STORAGE_RETRY_S", 0.2)

    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_daemon(home, load_settings(home))), daemon=True)
    thread.start()
    try:
        wait_for(lambda: (read_store(home).get_meta("daemon") or {}).get("pid") == os.getpid(), 30, "heartbeat")
        full.set()
        (home / "inbox" / "during.jsonl").write_bytes((FIXTURES / "text.jsonl").read_bytes())
        wait_for(lambda: "cannot write under" in caplog.text, 10, "the failed attempt")
        assert thread.is_alive(), "the daemon keeps running on a full disk"
        assert not read_store(home).all_datasets() and not rejected_files(Layout(home))
        full.clear()
        ds = wait_for(lambda: read_store(home).all_datasets(), 20, "ingest after space returns")
        assert ds[0]["name"] == "during.jsonl" and (home / ds[0]["path"]).is_file()
        assert not list(Layout(home).ingesting.iterdir()) and not rejected_files(Layout(home))
        wait_for(lambda: "storage is writable again" in caplog.text, 10, "the loop to notice")
    finally:
        request_stop()
        thread.join(30)
    assert result == [0]
