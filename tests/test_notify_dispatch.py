"""Notifier: never blocks, coalesces and rate-limits bursts, survives hanging and missing backends."""
from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from daemon.config import NotifyBackendSettings, NotifySettings
from daemon.notify import Notifier

from notify_fixtures import webhook_server  # noqa: F401 (pytest fixture)


def _settings(url: str | None, **kw) -> NotifySettings:
    backends = NotifyBackendSettings(desktop=False, webhook_url=url, timeout_seconds=kw.pop("timeout", 2.0))
    routes = kw.pop("events", {"file_rejected": ["webhook"], "job_failed": ["webhook"]})
    return NotifySettings(backends=backends, events=routes, **kw)


def _journal(home) -> list[dict]:
    path = home / "logs" / "notifications.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_burst_of_100_rejections_becomes_a_few_notifications(tmp_path, webhook_server):
    notifier = Notifier(_settings(webhook_server.url, rate_limit_per_minute=3, coalesce_seconds=0.05), tmp_path)
    spent = 0.0
    for i in range(100):
        t0 = time.perf_counter()
        notifier.notify("file_rejected", f"bad{i}.jsonl rejected", f"line 1: not JSON (file {i})", file=f"bad{i}")
        spent += time.perf_counter() - t0
        time.sleep(0.003)  # a realistic burst: the daemon rejects files one after another
    notifier.close(timeout=5)

    counts = [p["json"]["count"] for p in webhook_server.posts]
    assert sum(counts) == 100
    assert 2 <= len(counts) <= 4  # rate limit 3/min, plus one summary flushed at close
    assert counts[0] >= 1
    last = webhook_server.posts[-1]["json"]
    assert last["title"] == f"{counts[-1]} more files rejected"
    assert last["message"].startswith("latest: bad99.jsonl rejected")
    assert last["data"] == {"file": "bad99"}
    assert spent < 0.5, f"notify() must not block the daemon; 100 calls took {spent:.3f}s"
    assert [r["count"] for r in _journal(tmp_path)] == counts


def test_different_events_are_not_merged(tmp_path, webhook_server):
    notifier = Notifier(_settings(webhook_server.url, coalesce_seconds=0.05), tmp_path)
    notifier.notify("job_failed", "job a failed", "train: CUDA out of memory", job="a")
    notifier.notify("file_rejected", "x.jsonl rejected", "empty file")
    notifier.notify("job_succeeded", "job b succeeded", "not routed in these settings")
    notifier.close()
    got = sorted((p["json"]["event"], p["json"]["title"], p["json"]["count"]) for p in webhook_server.posts)
    assert got == [("file_rejected", "x.jsonl rejected", 1), ("job_failed", "job a failed", 1)]


def test_hanging_webhook_times_out_without_blocking_and_logs_once(tmp_path, webhook_server, caplog):
    webhook_server.delay_s = 5.0
    notifier = Notifier(_settings(webhook_server.url, timeout=0.3, coalesce_seconds=0.0), tmp_path)
    caplog.set_level(logging.WARNING, logger="daemon.notify")
    t0 = time.perf_counter()
    notifier.notify("job_failed", "job a failed", "first")
    assert time.perf_counter() - t0 < 0.05
    time.sleep(1.2)  # the first delivery has timed out by now
    notifier.notify("job_failed", "job b failed", "second")
    t0 = time.perf_counter()
    notifier.close(timeout=3)
    assert time.perf_counter() - t0 < 2.5

    outcomes = [r["backends"]["webhook"] for r in _journal(tmp_path)]
    assert len(outcomes) == 2
    assert all(o.startswith("skipped:") and "timed out" in o for o in outcomes), outcomes
    warnings = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "further failures are not logged" in warnings[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="desktop availability rules differ off Linux")
def test_missing_backend_is_skipped_with_logged_reason(tmp_path, webhook_server, caplog, monkeypatch):
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    backends = NotifyBackendSettings(desktop=True, webhook_url=webhook_server.url)
    settings = NotifySettings(backends=backends, events={"job_succeeded": ["desktop", "webhook", "pager"]},
                              coalesce_seconds=0.0)
    caplog.set_level(logging.WARNING, logger="daemon.notify")
    notifier = Notifier(settings, tmp_path)
    notifier.notify("job_succeeded", "job a succeeded", "eval accuracy 0.91")
    notifier.close()

    assert len(webhook_server.posts) == 1  # the working backend still delivers
    (record,) = _journal(tmp_path)
    assert record["backends"]["webhook"] == "sent"
    assert record["backends"]["desktop"].startswith("skipped: no desktop session")
    assert "unknown backend 'pager'" in record["backends"]["pager"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "backend desktop skipped: no desktop session" in logged
    assert "unknown backend 'pager'" in logged


def test_close_flushes_held_notifications_and_unrouted_events_are_dropped(tmp_path, webhook_server):
    notifier = Notifier(_settings(webhook_server.url, coalesce_seconds=30.0), tmp_path)
    notifier.notify("model_exported", "never routed", "")
    for i in range(5):
        notifier.notify("job_failed", f"job {i} failed", "boom")
    notifier.close()
    (post,) = webhook_server.posts
    assert post["json"]["count"] == 5 and post["json"]["title"] == "5 jobs failed"
