"""``trainbox notify test``: one notification through each configured backend, and which worked."""
from __future__ import annotations

import argparse

from rich.table import Table

from daemon.config import load_settings, resolve_home
from daemon.notify.backends import BACKENDS, configured, deliver
from daemon.notify.note import Note
from trainbox.protocol import EXIT_FAILED, EXIT_OK


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("notify", help="notifications")
    nsub = p.add_subparsers(dest="notify_command", required=True, metavar="ACTION")
    t = nsub.add_parser("test", parents=[common], help="send one test notification through each configured backend")
    t.add_argument("--backend", action="append", choices=sorted(BACKENDS),
                   help="test this backend even if not configured (repeatable)")
    t.add_argument("--event", default="job_succeeded", help="event to simulate (picks the sound and urgency)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_notify_test)


def test_backends(settings, names: list[str], event: str) -> dict[str, tuple[bool, str]]:
    """Probe and, where usable, send through each named backend synchronously."""
    note = Note(event, "test notification", "If you can see or hear this, trainbox notifications work.",
                {"test": True})
    results = {}
    for name in names:
        ok, detail = BACKENDS[name].probe(settings)
        if ok:
            ok, detail = deliver(name, note, settings)
        results[name] = (ok, detail)
    return results


def cmd_notify_test(args: argparse.Namespace) -> int:
    from daemon.cli import console, print_json

    settings = load_settings(resolve_home(args.home)).notify.backends
    if args.backend:  # an explicit request turns the backend on for this test
        settings = settings.model_copy(update={n: True for n in args.backend if n in ("desktop", "audio")})
        names = args.backend
    else:
        names = configured(settings)
    if not names:
        console.print("no notification backend is configured: see notify.backends in configs/daemon.yaml")
        return EXIT_FAILED
    results = test_backends(settings, names, args.event)
    if args.json:
        print_json({n: {"ok": ok, "detail": d} for n, (ok, d) in results.items()})
    else:
        table = Table(title="notification backends")
        for col in ("backend", "result", "detail"):
            table.add_column(col, overflow="fold")
        for name, (ok, detail) in results.items():
            table.add_row(name, "[green]sent[/]" if ok else "[red]failed[/]", detail)
        console.print(table)
    return EXIT_OK if all(ok for ok, _ in results.values()) else EXIT_FAILED
