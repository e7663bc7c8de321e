"""The daemon: wires the inbox watcher, ingest, supervisor and schedulers around one main loop.

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
_stop = threading.Event()
_wake = threading.Event()


def request_stop() -> None:
    """Stop the daemon gracefully (the path SIGTERM, Ctrl-C and the Windows service stop all take)."""
    _stop.set()
    _wake.set()


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # e.g. run inside a Windows service thread: the service calls request_stop()
    for name in ("SIGTERM", "SIGINT", "SIGBREAK", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, _frame: (
                log.warning("signal %d: stopping (running stages get %.0fs to checkpoint)", signum, _grace[0]),
                request_stop()))


_grace = [0.0]


def _trainbox_version() -> str:
    try:
        return version("trainbox")
    except PackageNotFoundError:
        return "dev"


def run_daemon(home: Path, settings: DaemonSettings, once: bool = False) -> int:
    """Run until stopped (or, with ``once``, until the inbox is empty and every runnable job ended)."""
    layout = Layout(Path(home))
    layout.create()
    _stop.clear()
    _grace[0] = settings.supervisor.stop_grace_seconds
    with HomeLock(layout.home):
        store = Store.for_home(layout.home)
        gpus = gpu_indices()
        notifier = Notifier(settings.notify, layout.home)
        checker = DatasetChecker(int(settings.limits.max_dataset_mb * 1e6), _wake)
        ingestor = Ingestor(layout, store, settings, len(gpus), notifier.notify, checker)
        supervisor = Supervisor(layout, store, settings, gpus, notifier.notify)
        watcher = InboxWatcher(layout.inbox, settings.watch, _wake)
        started = time.time()

        def heartbeat() -> None:
            store.set_meta("daemon", {"pid": os.getpid(), "started_at": utcnow(started),
                                      "heartbeat_at": utcnow(), "heartbeat_ts": time.time(),
                                      "version": _trainbox_version(), "home": str(layout.home)})

        _install_signal_handlers()
        ingestor.recover()
        supervisor.recover()
        watcher.start()
        heartbeat()  # after the observer runs: "alive" means files dropped now are seen
        watch = ResourceWatch(settings.resources.model_dump(), lambda kind, message, **data:
                              notifier.notify(kind, "trainbox resource warning", message))

        def check_resources() -> None:  # a training stage watches CPU, RAM and GPUs itself, with job context
            training = any(run.stage == "train" for run in list(supervisor.running.values()))
            watch.check(daemon_snapshot(layout.home, machine=not training))

        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(lambda: (watcher.rescan(), _wake.set()), "interval",
                          seconds=settings.watch.rescan_seconds, id="rescan")
        scheduler.add_job(check_resources, "interval", seconds=settings.resources.check_seconds, id="resources")
        scheduler.start()
        log.info("trainbox %s watching %s (pid %d, %d GPU(s))", _trainbox_version(), layout.inbox,
                 os.getpid(), len(gpus))
        last_beat = 0.0
        storage_error: OSError | None = None
        try:
            while not _stop.is_set():
                _wake.clear()
                try:
                    if any(layout.ingesting.iterdir()):  # claims an earlier storage error left half done
                        ingestor.recover(at_start=False)
                    ingestor.finish_checked()  # first: it frees the checker for the datasets ready now
                    _ingest_a_slice(watcher, ingestor)
                    ingestor.create_due_default_jobs()
                    _apply_requests(layout.home, store, supervisor)
                    supervisor.tick()
                    if time.monotonic() - last_beat > 5:
                        heartbeat()
                        last_beat = time.monotonic()
                except OSError as exc:
                    # disk full, a share gone read-only: keep every file where it is and retry, rather than
                    # exit and crash-loop under the service manager
                    if storage_error is None:
                        log.error("cannot write under %s (%s); nothing is lost, retrying every %.0f s",
                                  layout.home, exc, STORAGE_RETRY_S)
                        notifier.notify("resource_warning", "trainbox cannot write its files", str(exc))
                    storage_error = exc
                    watcher.rescan()
                    _stop.wait(STORAGE_RETRY_S)
                    continue
                if storage_error is not None:
                    log.info("storage is writable again; carrying on")
                    storage_error = None
                if once and _idle(layout, store, watcher, supervisor):
                    log.info("nothing left to do (--once): exiting")
                    break
                _wake.wait(settings.supervisor.poll_seconds if supervisor.running else 0.2)
        finally:
            if supervisor.running:
                log.warning("stopping %d running stage(s)", len(supervisor.running))
            supervisor.stop_all()
            scheduler.shutdown(wait=False)
            watcher.stop()
            notifier.close()
            try:
                store.set_meta("daemon", {**(store.get_meta("daemon") or {}), "pid": None,
                                          "stopped_at": utcnow()})
            except OSError as exc:  # the lock's release tells readers we are gone anyway
                log.error("could not record the daemon's stop: %s", exc)
            log.info("trainbox stopped")
    return EXIT_OK


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
