"""The notification dispatcher: a queue and one worker thread, so the daemon never waits on a backend.

Per event, notifications arriving within ``coalesce_seconds`` of the first are merged, and at most
``rate_limit_per_minute`` go out per minute; the rest wait and go out later as one ("37 more files rejected").
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from daemon.config import NotifySettings
from daemon.layout import Layout
from daemon.notify.backends import BACKENDS, deliver
from daemon.notify.note import Note, coalesce
from trainbox.fsio import append_line_durably

log = logging.getLogger(__name__)
WINDOW_S = 60.0
PROBE_TTL_S = 300.0  # a desktop session or sound server may appear later: check again now and then
_STOP = object()


class Notifier:
    """``notify()`` returns at once; a worker thread coalesces, rate-limits and delivers."""

    def __init__(self, settings: NotifySettings, home: Path):
        self.settings = settings
        self.journal = Layout(Path(home)).logs / "notifications.jsonl"
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._pending: dict[str, tuple[float, list[Note]]] = {}  # event -> (first arrival, notes)
        self._sent: dict[str, deque[float]] = {}
        self._probes: dict[str, tuple[float, tuple[bool, str]]] = {}
        self._failing: set[str] = set()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def notify(self, event: str, title: str, message: str, *, speak: bool = False, **data: Any) -> None:
        """Queue a notification for the backends ``settings.events[event]`` names. Never blocks or raises.

        ``speak``: the audio backend also speaks it (a job's ``notify.speak``), as with ``backends.speak``."""
        if not self.settings.events.get(event):
            log.debug("notification %s not routed to any backend: %s", event, title)
            return
        try:
            self._queue.put_nowait(Note(event, title, message, data, speak=speak))
        except queue.Full:
            self._dropped += 1  # the worker is stuck far behind; losing a pop-up beats growing without bound

    def close(self, timeout: float = 5) -> None:
        """Send what is still held back (one merged note per event), then stop the worker."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("notifications: queue full at shutdown, pending notifications dropped")
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("notifications: still delivering after %gs at shutdown; not waiting longer", timeout)

    # worker -------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._wait_seconds(time.monotonic()))
            except queue.Empty:
                item = None
            while item is not None:  # take everything already queued, so a burst is merged
                if item is _STOP:
                    stopping = True
                else:
                    self._pending.setdefault(item.event, (time.monotonic(), []))[1].append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            self._send_ready(time.monotonic(), flush=stopping)
        if self._dropped:
            log.warning("notifications: %d dropped because delivery fell far behind", self._dropped)

    def _window(self, event: str, now: float) -> deque[float]:
        window = self._sent.setdefault(event, deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        return window

    def _ready_at(self, event: str, now: float) -> float:
        first, _ = self._pending[event]
        window = self._window(event, now)
        slot = now if len(window) < self.settings.rate_limit_per_minute else window[0] + WINDOW_S
        return max(first + self.settings.coalesce_seconds, slot)

    def _wait_seconds(self, now: float) -> float:
        if not self._pending:
            return 1.0
        soonest = min(self._ready_at(event, now) for event in self._pending)
        return min(max(soonest - now, 0.01), 1.0)

    def _send_ready(self, now: float, flush: bool) -> None:
        for event in list(self._pending):
            if flush or self._ready_at(event, now) <= now:
                _, notes = self._pending.pop(event)
                window = self._window(event, now)
                note = coalesce(notes, more=bool(window))
                window.append(now)
                self._dispatch(note)

    def _dispatch(self, note: Note) -> None:
        outcome: dict[str, str] = {}
        for name in self.settings.events.get(note.event, []):
            ok, detail = self._usable(name)
            if ok:
                ok, detail = deliver(name, note, self.settings.backends)
                self._report(name, ok, detail)
            outcome[name] = "sent" if ok else f"skipped: {detail}"
        record = {"time": note.time, "event": note.event, "title": note.title, "count": note.count,
                  "backends": outcome}
        append_line_durably(self.journal, json.dumps(record, default=str))

    def _usable(self, name: str) -> tuple[bool, str]:
        """Cached availability; the first time a backend is unusable, say why (once)."""
        if name not in BACKENDS:
            result = (False, f"unknown backend {name!r} in notify.events (known: {', '.join(BACKENDS)})")
        else:
            checked, result = self._probes.get(name, (-PROBE_TTL_S, (False, "")))
            if time.monotonic() - checked >= PROBE_TTL_S:
                result = BACKENDS[name].probe(self.settings.backends)
                self._probes[name] = (time.monotonic(), result)
        if not result[0]:
            self._report(name, *result, unusable=True)
        return result

    def _report(self, name: str, ok: bool, detail: str, unusable: bool = False) -> None:
        """Log a backend's first failure (with the reason) and its recovery; stay quiet in between."""
        if ok:
            if name in self._failing:
                self._failing.discard(name)
                log.info("notification backend %s works again", name)
            return
        if name not in self._failing:
            self._failing.add(name)
            verb = "skipped" if unusable else "failed"
            log.warning("notification backend %s %s: %s (further failures are not logged)", name, verb, detail)
