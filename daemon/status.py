"""The ``status --json`` view: daemon health, counts, rejected files. Reads files only."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from daemon.inbox import is_ignored
from daemon.jobs import JSON_SCHEMA_VERSION
from daemon.layout import Layout
from daemon.lock import lock_is_held
from daemon.store import Store, pid_alive

ERROR_SUFFIX = ".error.txt"


def rejected_files(layout: Layout) -> list[dict[str, Any]]:
    """Every file in ``rejected/`` with the reason written beside it, newest first."""
    out = []
    for err in layout.rejected.glob(f"*{ERROR_SUFFIX}"):
        name = err.name[: -len(ERROR_SUFFIX)]
        text = err.read_text(encoding="utf-8", errors="replace")
        out.append({
            "file": name,
            "path": str(layout.rejected / name),
            "error_file": str(err),
            "reason": _reason(text),
            "time": err.stat().st_mtime,
        })
    return sorted(out, key=lambda r: r["time"], reverse=True)


def _reason(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return " | ".join(lines[:3])[:500]


def daemon_view(home: Path, store: Store) -> dict[str, Any]:
    beat = store.get_meta("daemon") or {}
    alive = bool(beat.get("pid")) and pid_alive(beat.get("pid")) and lock_is_held(home)
    return {
        "pid": beat.get("pid"),
        "alive": alive,
        "started_at": beat.get("started_at"),
        "heartbeat_at": beat.get("heartbeat_at"),
        "heartbeat_age_s": round(time.time() - beat["heartbeat_ts"], 1) if beat.get("heartbeat_ts") else None,
        "watching": str(Layout(home).inbox) if alive else None,
        "version": beat.get("version"),
    }


def status_view(home: Path, store: Store) -> dict[str, Any]:
    layout = Layout(home)
    jobs = store.all_jobs()
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "home": str(home),
        "daemon": daemon_view(home, store),
        "datasets": store.dataset_count(),
        "jobs": dict(Counter(j.state for j in jobs)),
        "inbox_pending": sorted(p.name for p in layout.inbox.glob("*") if p.is_file() and not is_ignored(p.name))
        if layout.inbox.exists() else [],
        "rejected": rejected_files(layout) if layout.rejected.exists() else [],
        "events": store.recent_events(10),
    }
