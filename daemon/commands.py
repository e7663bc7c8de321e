"""Core commands: run, submit, status, jobs, show, cancel, retry."""
from __future__ import annotations

import argparse
import shutil
import uuid
from pathlib import Path

from daemon.cli import print_json
from daemon.config import load_settings, resolve_home
from daemon.control import (RequestRefused, cancel_idle_job, check_request, retry_job, write_request)
from daemon.jobs import JSON_SCHEMA_VERSION, job_view
from daemon.layout import Layout
from daemon.lock import HomeLock, lock_is_held
from daemon.status import status_view
from daemon.store import Store
from trainbox.errors import DaemonAlreadyRunning
from trainbox.fsio import fsync_dir
from trainbox.protocol import EXIT_INVALID, EXIT_OK


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="run the daemon (watch the inbox, run jobs)")
    p.add_argument("--once", action="store_true", help="process what is there, run the jobs, exit when idle")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", parents=[common], help="put dataset / job files into the inbox")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=cmd_submit)

    for name, func, helptext in (("status", cmd_status, "daemon health, counts and rejected files"),
                                 ("jobs", cmd_jobs, "list jobs")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--json", action="store_true", help="machine-readable output (see README)")
        p.set_defaults(func=func)

    p = sub.add_parser("show", parents=[common], help="one job in detail")
    p.add_argument("job", help="job id, unique id prefix, or name (newest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    for name, func, helptext in (("cancel", cmd_cancel, "cancel a job (a running stage is stopped gracefully)"),
                                 ("retry", cmd_retry, "run a failed, cancelled or interrupted job again "
                                                      "from its first unfinished stage")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("job")
        p.set_defaults(func=func)


def _home(args: argparse.Namespace) -> Path:
    return resolve_home(args.home)


def _store(home: Path) -> Store:
    return Store.for_home(home, readonly=True)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.app import run_daemon
    from daemon.cli import setup_logging

    home = _home(args)
    setup_logging(args.verbose, Layout(home).logs / "daemon.log")
    settings = load_settings(home)
    return run_daemon(home, settings, once=args.once)


def cmd_submit(args: argparse.Namespace) -> int:
    from daemon.cli import console, say_error

    inbox = Layout(_home(args)).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    for src in args.files:
        if not src.is_file():
            say_error(f"{src}: no such file")
            return EXIT_INVALID
    for src in args.files:
        # copy under a hidden temp name, then rename: the daemon never sees a half-written file
        tmp = inbox / f".{src.name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copyfile(src, tmp)
        tmp.replace(inbox / src.name)
        fsync_dir(inbox)
        console.print(f"submitted {src} -> {inbox / src.name}")
    if not lock_is_held(_home(args)):
        console.print("[yellow]no daemon is running on this home:[/] start one with 'trainbox run'")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.cli import console
    from daemon.ui import status_panel

    home = _home(args)
    view = status_view(home, _store(home))
    if args.json:
        print_json(view)
    else:
        console.print(status_panel(view))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from daemon.cli import console
    from daemon.ui import jobs_table

    jobs = [job_view(j) for j in _store(_home(args)).all_jobs()]
    if args.json:
        print_json({"schema_version": JSON_SCHEMA_VERSION, "jobs": jobs})
    else:
        console.print(jobs_table(jobs))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from daemon.cli import console, say_error
    from daemon.ui import job_panel

    store = _store(_home(args))
    job = store.find_job(args.job)
    if job is None:
        say_error(f"no job matches {args.job!r}; 'trainbox jobs' lists them")
        return EXIT_INVALID
    view = job_view(job)
    trials = [job_view(j) for j in store.trials_of(job.id)]
    if args.json:
        print_json({"schema_version": JSON_SCHEMA_VERSION, "job": {**view, "trials": trials}})
    else:
        console.print(job_panel(view, trials))
    return EXIT_OK


def _request(args: argparse.Namespace, action: str) -> int:
    from daemon.cli import console, say_error

    home = _home(args)
    job = _store(home).find_job(args.job)
    if job is None:
        say_error(f"no job matches {args.job!r}; 'trainbox jobs' lists them")
        return EXIT_INVALID
    try:
        check_request(_store(home), action, job.id)
        if lock_is_held(home):
            write_request(home, action, job.id)
            console.print(f"{action} of {job.id} sent to the running daemon")
            return EXIT_OK
        with HomeLock(home):
            store = Store.for_home(home)
            check_request(store, action, job.id)
            (cancel_idle_job if action == "cancel" else retry_job)(store, job.id)
        console.print(f"{job.id}: {action} done" + (" (runs when the daemon starts)" if action == "retry" else ""))
    except RequestRefused as exc:
        say_error(str(exc))
        return EXIT_INVALID
    except DaemonAlreadyRunning:
        write_request(home, action, job.id)  # a daemon started meanwhile: let it apply the request
        console.print(f"{action} of {job.id} sent to the running daemon")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    return _request(args, "cancel")


def cmd_retry(args: argparse.Namespace) -> int:
    return _request(args, "retry")
