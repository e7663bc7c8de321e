"""The daemon: ``Daemon`` wires the inbox watcher, ingest, supervisor and schedulers around one main loop.

Only the main loop thread touches the store and starts children; the watchdog and APScheduler
threads only note work and wake it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.config import DaemonSettings
from daemon.control import RequestRefused, check_request, pending_requests, retry_job
from daemon.datasetcheck import DatasetChecker
from daemon.gpus import gpu_indices
from daemon.inbox import InboxWatcher, is_ignored
from daemon.ingest import Ingestor
from daemon.layout import Layout
from daemon.lock import HomeLock
from daemon.notify import Notifier
from daemon.resources import ResourceWatch, daemon_snapshot
from daemon.store import Store, utcnow
from daemon.supervisor import Supervisor
from trainbox.protocol import EXIT_OK

log = logging.getLogger(__name__)
STORAGE_RETRY_S = 5.0
# the main loop ingests for at most this long before it supervises, heartbeats and reads requests again
INGEST_SLICE_S = 1.0
HEARTBEAT_S = 5.0
_daemons: list["Daemon"] = []  # the daemons this process runs (one, in practice): request_stop() reaches them


def request_stop() -> None:
    """Stop this process's daemon gracefully (the path SIGTERM, Ctrl-C and the Windows service stop all take)."""
    for daemon in list(_daemons):
        daemon.request_stop()


def _trainbox_version() -> str:
    try:
        return version("trainbox")
    except PackageNotFoundError:
        return "dev"


class Daemon:
    """The daemon's parts around one main loop: ``start()`` takes the home and wires and recovers them,
    ``iteration()`` does one pass of work, ``stop()`` shuts them down; ``run()`` is the loop itself.

    Only the thread that calls ``iteration()`` touches the store and starts children; the watchdog and
    APScheduler threads only note work and wake it.
    """

    def __init__(self, home: Path, settings: DaemonSettings, once: bool = False):
        self.layout = Layout(Path(home))
        self.settings = settings
        self.once = once
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.storage_error: OSError | None = None
        self._lock: HomeLock | None = None
        self._started = 0.0
        self._last_beat = 0.0

    # start ----------------------------------------------------------------
    def start(self) -> None:
        """Take the home (raises DaemonAlreadyRunning), finish what a crash left, then watch the inbox."""
        self.layout.create()
        self._lock = HomeLock(self.layout.home)
        self._lock.acquire()
        _daemons.append(self)
        try:
            self._wire()
        except BaseException:
            self._release()
            raise

    def _wire(self) -> None:
        settings, layout = self.settings, self.layout
        self._started = time.time()
        self.store = Store.for_home(layout.home)
        gpus = gpu_indices()
        self.notifier = Notifier(settings.notify, layout.home)
        checker = DatasetChecker(int(settings.limits.max_dataset_mb * 1e6), self.wake)
        self.ingestor = Ingestor(layout, self.store, settings, len(gpus), self.notifier.notify, checker)
        self.supervisor = Supervisor(layout, self.store, settings, gpus, self.notifier.notify)
        self.watcher = InboxWatcher(layout.inbox, settings.watch, self.wake)
        self._install_signal_handlers()
        self.ingestor.recover()
        self.supervisor.recover()
        self.watcher.start()
        self.heartbeat()  # after the observer runs: "alive" means files dropped now are seen
        self._last_beat = time.monotonic()
        self.resources = ResourceWatch(settings.resources.model_dump(), lambda kind, message, **data:
                                       self.notifier.notify(kind, "trainbox resource warning", message))
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(lambda: (self.watcher.rescan(), self.wake.set()), "interval",
                               seconds=settings.watch.rescan_seconds, id="rescan")
        self.scheduler.add_job(self._check_resources, "interval", seconds=settings.resources.check_seconds,
                               id="resources")
        self.scheduler.start()
        log.info("trainbox %s watching %s (pid %d, %d GPU(s))", _trainbox_version(), layout.inbox,
                 os.getpid(), len(gpus))

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. run inside a Windows service thread: the service calls request_stop()
        grace = self.settings.supervisor.stop_grace_seconds
        for name in ("SIGTERM", "SIGINT", "SIGBREAK", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda signum, _frame: (
                    log.warning("signal %d: stopping (running stages get %.0fs to checkpoint)", signum, grace),
                    self.request_stop()))

    def heartbeat(self) -> None:
        """Say in the store that this daemon is alive (status and the CLI read it)."""
        self.store.set_meta("daemon", {"pid": os.getpid(), "started_at": utcnow(self._started),
                                       "heartbeat_at": utcnow(), "heartbeat_ts": time.time(),
                                       "version": _trainbox_version(), "home": str(self.layout.home)})

    def _check_resources(self) -> None:  # a training stage watches CPU, RAM and GPUs itself, with job context
        training = any(run.stage == "train" for run in list(self.supervisor.running.values()))
        self.resources.check(daemon_snapshot(self.layout.home, machine=not training))

    # the loop -------------------------------------------------------------
    def iteration(self) -> bool:
        """One pass: finish claims, ingest a slice, create due default jobs, apply requests, supervise,
        heartbeat. Returns False once ``--once`` has nothing left to do. A storage error (disk full, a share
        gone read-only) keeps every file where it is; the pass is retried after ``STORAGE_RETRY_S``."""
        try:
            if any(self.layout.ingesting.iterdir()):  # claims an earlier storage error left half done
                self.ingestor.recover(at_start=False)
            self.ingestor.finish_checked()  # first: it frees the checker for the datasets ready now
            _ingest_a_slice(self.watcher, self.ingestor)
            self.ingestor.create_due_default_jobs()
            _apply_requests(self.layout.home, self.store, self.supervisor)
            self.supervisor.tick()
            if time.monotonic() - self._last_beat > HEARTBEAT_S:
                self.heartbeat()
                self._last_beat = time.monotonic()
        except OSError as exc:
            # rather than exit and crash-loop under the service manager: pause and retry
            if self.storage_error is None:
                log.error("cannot write under %s (%s); nothing is lost, retrying every %.0f s",
                          self.layout.home, exc, STORAGE_RETRY_S)
                self.notifier.notify("resource_warning", "trainbox cannot write its files", str(exc))
            self.storage_error = exc
            self.watcher.rescan()
            self.stopping.wait(STORAGE_RETRY_S)
            return True
        if self.storage_error is not None:
            log.info("storage is writable again; carrying on")
            self.storage_error = None
        if self.once and _idle(self.layout, self.store, self.watcher, self.supervisor):
            log.info("nothing left to do (--once): exiting")
            return False
        return True

    def run(self) -> int:
        """Start, loop until stopped (or, with ``once``, until idle), stop."""
        self.start()
        try:
            while not self.stopping.is_set():
                self.wake.clear()
                if not self.iteration():
                    break
                if self.storage_error is None:
                    self.wake.wait(self.settings.supervisor.poll_seconds if self.supervisor.running else 0.2)
        finally:
            self.stop()
        return EXIT_OK

    def request_stop(self) -> None:
        """Make ``run()`` end after the current pass (thread- and signal-safe)."""
        self.stopping.set()
        self.wake.set()

    # stop -----------------------------------------------------------------
    def stop(self) -> None:
        """Stop running stages (they checkpoint within the grace period), the watchers and the notifier;
        record the stop and release the home."""
        try:
            if self.supervisor.running:
                log.warning("stopping %d running stage(s)", len(self.supervisor.running))
            self.supervisor.stop_all()
            self.scheduler.shutdown(wait=False)
            self.watcher.stop()
            self.notifier.close()
            try:
                self.store.set_meta("daemon", {**(self.store.get_meta("daemon") or {}), "pid": None,
                                               "stopped_at": utcnow()})
            except OSError as exc:  # the lock's release tells readers we are gone anyway
                log.error("could not record the daemon's stop: %s", exc)
            log.info("trainbox stopped")
        finally:
            self._release()

    def _release(self) -> None:
        if self in _daemons:
            _daemons.remove(self)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def run_daemon(home: Path, settings: DaemonSettings, once: bool = False) -> int:
    """Run until stopped (or, with ``once``, until the inbox is empty and every runnable job ended)."""
    return Daemon(home, settings, once=once).run()


def _ingest_a_slice(watcher: InboxWatcher, ingestor: Ingestor) -> None:
    """Take ready files for at most INGEST_SLICE_S (a burst must not hold supervision and heartbeats);
    a dataset waits in the inbox while the checker is busy (its result wakes the loop)."""
    slice_ends = time.monotonic() + INGEST_SLICE_S
    later, out_of_time = [], False
    for path in watcher.ready_files():
        out_of_time = out_of_time or time.monotonic() > slice_ends
        if out_of_time or not ingestor.can_take(path):
            later.append(path)
        else:
            ingestor.ingest(path)
    if later:
        watcher.put_back(later, wake=out_of_time)


def _idle(layout: Layout, store: Store, watcher: InboxWatcher, supervisor: Supervisor) -> bool:
    if watcher.has_pending() or _inbox_has_entries(layout.inbox):
        if not watcher.has_pending():
            watcher.rescan()
        return False
    if any(layout.ingesting.iterdir()) or supervisor.busy():
        return False
    return not store.default_jobs_due()


def _inbox_has_entries(inbox: Path) -> bool:
    """Anything but folders and temporary names (links and FIFOs too: they are set aside with a reason)."""
    with os.scandir(inbox) as entries:
        return any(not e.is_dir(follow_symlinks=False) and not is_ignored(e.name) for e in entries)


def _apply_requests(home: Path, store: Store, supervisor: Supervisor) -> None:
    for path, req in pending_requests(home):
        action, job_id = req.get("action"), req.get("job", "")
        try:
            check_request(store, action, job_id)
            if action == "cancel":
                supervisor.cancel(job_id)
            elif action == "retry":
                retry_job(store, job_id)
                log.info("job %s queued again", job_id)
            else:
                raise RequestRefused(f"unknown action {action!r}")
        except RequestRefused as exc:
            log.warning("request %s ignored: %s", path.name, exc)
        path.unlink()
