"""Watch the inbox: a watchdog observer plus periodic rescans; report files once they are complete.

A file is complete when it was renamed in from the same folder tree or its writer closed it (inotify
close-after-write), or when its size and mtime stayed the same for ``stable_seconds`` and (on Linux) no
process holds it open for writing: other platforms, network drives, files moved in from elsewhere,
files that were there before the daemon started.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                             FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer

from daemon.config import WatchSettings

log = logging.getLogger(__name__)

if sys.platform.startswith("linux"):
    from watchdog.observers import inotify_move_event_grouper

    # watchdog holds every unpaired IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and its queue
    # is FIFO, so each of our own claims (a rename out of the inbox) delayed every later event by 0.5 s.
    # Both halves of a rename arrive in one read from the kernel, so a short wait still pairs them.
    inotify_move_event_grouper.InotifyMoveEventGrouper.delay = 0.02

IGNORED = ("*.tmp", "*.part", "*.crdownload", "~*", ".*", "*.swp", "*~")
# a writer that keeps a file open without writing for this long is presumed gone
OPEN_WRITER_TIMEOUT_S = 600.0
# after a close, wait this long for a writer that reopens the file (create-empty-then-fill tools)
SETTLE_AFTER_CLOSE_S = 0.15


def is_ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    changed_at: float
    closed: bool  # the writer closed it (inotify close-after-write) or it was renamed in


def _drop_stop_race(record: logging.LogRecord) -> bool:
    return "called when the thread is inactive" not in record.getMessage()


class InboxWatcher(FileSystemEventHandler):
    """Collects candidate files from events and rescans; ``ready_files`` returns the complete ones."""

    def __init__(self, inbox: Path, settings: WatchSettings, wake: threading.Event | None = None):
        self.inbox = Path(inbox)
        self.settings = settings
        self.wake = wake or threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[Path, _Candidate] = {}
        self._observer = Observer()
        self._close_events = settings.use_close_events and self._observer.__class__.__name__ == "InotifyObserver"

    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(self, str(self.inbox), recursive=False)
        self._observer.start()
        self.rescan()

    def stop(self) -> None:
        # watchdog's inotify reader, woken by its own stop(), logs "queue_events() called when the thread is
        # inactive" at ERROR; that race inside watchdog is harmless, so it is not shown as an error of ours
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        inotify_log.addFilter(_drop_stop_race)
        try:
            self._observer.stop()
            self._observer.join(timeout=5)
        finally:
            inotify_log.removeFilter(_drop_stop_race)

    # events ---------------------------------------------------------------
    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            self._forget(Path(os.fsdecode(event.src_path)))
            dest = Path(os.fsdecode(event.dest_path))
            if self._ours(dest):
                self._note(dest, closed=True)
        elif isinstance(event, FileDeletedEvent):
            self._forget(Path(os.fsdecode(event.src_path)))
        elif isinstance(event, FileClosedEvent):
            path = Path(os.fsdecode(event.src_path))
            if self._ours(path):
                self._note(path, closed=self._close_events)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            path = Path(os.fsdecode(event.src_path))
            if self._ours(path):
                self._note(path, closed=False)

    def _ours(self, path: Path) -> bool:
        return path.parent == self.inbox and not is_ignored(path.name)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def _note(self, path: Path, closed: bool) -> None:
        try:
            st = path.lstat()  # never through a link: what is in the inbox, not what it points to
        except FileNotFoundError:
            self._forget(path)
            return
        with self._lock:
            self._pending[path] = _Candidate(st.st_size, st.st_mtime_ns, time.monotonic(), closed)
        self.wake.set()

    # rescans --------------------------------------------------------------
    def rescan(self) -> None:
        """Pick up files whose events were missed (daemon down, OS queue overflow, network drive)."""
        try:
            entries = list(os.scandir(self.inbox))
        except FileNotFoundError:
            return
        added = False
        for entry in entries:
            path = Path(entry.path)
            # every entry but a real folder: links, FIFOs, sockets and devices are reported too, so that
            # ingest sets them aside with a reason instead of leaving them unexplained
            if entry.is_dir(follow_symlinks=False) or is_ignored(entry.name):
                continue
            with self._lock:
                if path in self._pending:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                self._pending[path] = _Candidate(st.st_size, st.st_mtime_ns, time.monotonic(), False)
                added = True
        if added:
            self.wake.set()

    def ready_files(self) -> list[Path]:
        """Complete files, job YAMLs first (so a job dropped with its dataset claims it), oldest first."""
        ready = self._complete_candidates()
        if any(not closed for _, _, closed in ready):
            busy = open_for_writing(self.inbox)  # a writer that paused, or started before we watched
            if busy:
                now = time.monotonic()
                with self._lock:
                    for changed_at, path, closed in ready:
                        if path in busy and not closed and now - changed_at < OPEN_WRITER_TIMEOUT_S:
                            self._pending[path] = _Candidate(-1, -1, changed_at, closed)
                ready = [r for r in ready if r[2] or r[1] not in busy or now - r[0] >= OPEN_WRITER_TIMEOUT_S]
        ready.sort(key=lambda item: (item[1].suffix not in (".yaml", ".yml"), item[0]))
        return [path for _, path, _ in ready]

    def _complete_candidates(self) -> list[tuple[float, Path, bool]]:
        now = time.monotonic()
        ready: list[tuple[float, Path, bool]] = []
        with self._lock:
            for path, cand in list(self._pending.items()):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._pending[path]
                    continue
                if stat.S_ISDIR(st.st_mode):
                    del self._pending[path]
                    continue
                if not stat.S_ISREG(st.st_mode):  # nothing to wait for: it is set aside unread
                    ready.append((cand.changed_at, path, True))
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                    if cand.size != -1:  # -1: re-armed after an open-writer check, not a change
                        cand.changed_at, cand.closed = now, False
                    cand.size, cand.mtime_ns = st.st_size, st.st_mtime_ns
                    continue
                quiet = now - cand.changed_at
                if (cand.closed and quiet >= SETTLE_AFTER_CLOSE_S) or quiet >= self.settings.stable_seconds:
                    ready.append((cand.changed_at, path, cand.closed))
                    del self._pending[path]
        return ready

    def put_back(self, paths: list[Path], wake: bool = True) -> None:
        """Files ``ready_files`` returned that were not taken yet: ready again at the next call, in order;
        ``wake``: at once (else when something else wakes the loop)."""
        with self._lock:
            for order, path in enumerate(paths):
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                self._pending.setdefault(path, _Candidate(st.st_size, st.st_mtime_ns, float(order) - 1e9, True))
        if wake:
            self.wake.set()

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)


def open_for_writing(folder: Path) -> set[Path]:
    """Files in ``folder`` that some process holds open for writing (Linux /proc; empty elsewhere)."""
    proc = Path("/proc")
    if not sys.platform.startswith("linux") or not proc.is_dir():
        return set()
    prefix = str(folder) + os.sep
    busy: set[Path] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = list(os.scandir(fd_dir))
        except OSError:
            continue  # process gone or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd.path)
                if not target.startswith(prefix):
                    continue
                flags = (fd_dir.parent / "fdinfo" / fd.name).read_text().split("flags:")[1].split()[0]
            except (OSError, IndexError):
                continue
            if int(flags, 8) & (os.O_WRONLY | os.O_RDWR):
                busy.add(Path(target))
    return busy
