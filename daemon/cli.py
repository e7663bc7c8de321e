"""``trainbox`` command line: parser, logging, dispatch. Commands live in the modules listed below."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import logging.handlers
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from trainbox.errors import DaemonAlreadyRunning, InvalidInput
from trainbox.protocol import EXIT_INVALID

# Each module exposes add_commands(subparsers, common) and sets args.func(args) -> exit code.
COMMAND_MODULES = [
    "daemon.commands",
    "daemon.doctor",
    "daemon.modelregistry",
    "daemon.notify.cli",
    "daemon.top",
    "daemon.service",
]

console = Console()
err_console = Console(stderr=True)


def say_error(message: str) -> None:
    """A user-facing error on stderr, never wrapped (scripts grep it)."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def print_json(obj: object) -> None:
    """Machine-readable output of a ``--json`` command on stdout (never wrapped or coloured)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def setup_logging(verbose: bool = False, log_file: Path | None = None) -> None:
    """Rich handler on a terminal, plain lines otherwise; a rotating file under logs/ for the daemon."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=10_000_000, backupCount=5, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", help="trainbox home (default: $TRAINBOX_HOME, else the current directory)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser = argparse.ArgumentParser(prog="trainbox", description="Drop a dataset or job in inbox/; get a model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (InvalidInput, DaemonAlreadyRunning) as exc:
        say_error(str(exc))
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
