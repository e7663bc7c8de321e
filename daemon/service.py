"""``trainbox service install|uninstall|print``: run the daemon at boot under systemd or as a Windows service."""
from __future__ import annotations

import argparse
import getpass
import math
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from daemon.config import DaemonSettings, load_settings, resolve_home
from trainbox.fsio import write_text_atomically
from trainbox.protocol import EXIT_FAILED, EXIT_OK

STOP_MARGIN_S = 30  # after the stage grace: the daemon still closes the store, notifier and watcher


class ServiceError(Exception):
    """Installing or removing the service failed; the message says how to fix it."""


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("service", help="start the daemon at boot (systemd unit or Windows service)")
    ssub = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    for action, helptext in (("install", "write, enable and start the service"),
                             ("uninstall", "stop, disable and remove the service"),
                             ("print", "show the systemd unit (or Windows service settings) without installing")):
        a = ssub.add_parser(action, parents=[common], help=helptext)
        kind = a.add_mutually_exclusive_group()
        kind.add_argument("--systemd", action="store_true", help="a systemd unit (default on Linux)")
        kind.add_argument("--windows", action="store_true", help="a Windows service through pywin32")
        a.add_argument("--user", action="store_true", help="a systemd user unit (no root needed)")
        a.add_argument("--name", default="trainbox", help="service name (one per home; default trainbox)")
        if action == "install":
            a.add_argument("--no-start", action="store_true", help="write and enable, but do not start now")
        a.set_defaults(func=cmd_service, action=action)


def daemon_command(home: Path) -> list[str]:
    """The command that runs this installation's daemon: this interpreter, so the venv is the right one."""
    return [sys.executable, "-m", "daemon.cli", "run", "--home", str(home)]


def _source_root() -> Path | None:
    """The checkout to put on PYTHONPATH when trainbox runs from source without being installed."""
    try:
        distribution("trainbox")
        return None
    except PackageNotFoundError:
        return Path(__file__).resolve().parent.parent


def stop_timeout_seconds(settings: DaemonSettings) -> int:
    return math.ceil(settings.supervisor.stop_grace_seconds) + STOP_MARGIN_S


def systemd_unit(home: Path, settings: DaemonSettings, user_unit: bool, run_as: str | None = None) -> str:
    """The unit text. SIGTERM goes to the daemon alone (KillMode=mixed), which stops each stage and waits for
    its emergency checkpoint; only what is left after TimeoutStopSec is killed."""
    exec_start = " ".join(_systemd_quote(a) for a in daemon_command(home))
    env = ["PYTHONUNBUFFERED=1", f"TRAINBOX_HOME={home}"]
    root = _source_root()
    if root is not None:
        env.append(f"PYTHONPATH={root}")
    lines = [
        "# Written by 'trainbox service install'; 'trainbox service print' shows the current version.",
        "[Unit]",
        f"Description=trainbox daemon for {home}",
        *(["After=network.target"] if not user_unit else []),
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={str(home).replace('%', '%%')}",  # a path here takes no quotes, only %-escaping
        *(f'Environment={_systemd_quote(e, env=True)}' for e in env),
    ]
    if not user_unit and run_as:
        lines.append(f"User={run_as}")
    lines += [
        "Restart=on-failure",
        "RestartSec=10",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout_seconds(settings)}",
        "StandardOutput=journal",
        "StandardError=journal",
        "SyslogIdentifier=trainbox",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def _systemd_quote(arg: str, env: bool = False) -> str:
    """Quote for ExecStart= (``$`` expands there) or, with ``env``, Environment= (always quoted, no ``$``)."""
    if arg and not env and not any(c in arg for c in " \t\"'\\;$%"):
        return arg
    quoted = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (quoted if env else quoted.replace("$", "$$")) + '"'


def unit_path(name: str, user_unit: bool) -> Path:
    if user_unit:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return config / "systemd" / "user" / f"{name}.service"
    return Path("/etc/systemd/system") / f"{name}.service"


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(user_unit: bool, *args: str) -> None:
    cmd = ["systemctl"] + (["--user"] if user_unit else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def install_systemd(home: Path, settings: DaemonSettings, name: str, user_unit: bool, start: bool) -> list[str]:
    """Write the unit, then enable (and start) it where systemd runs. Returns what was done, for the user."""
    run_as = os.environ.get("SUDO_USER") or getpass.getuser()
    path = unit_path(name, user_unit)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, systemd_unit(home, settings, user_unit, run_as))
    except PermissionError:
        raise ServiceError(f"cannot write {path}: run with sudo for a system unit, or add --user") from None
    done = [f"wrote {path}"]
    if not systemd_running():
        scope = "--user " if user_unit else ""
        return done + [f"systemd is not running here: enable later with 'systemctl {scope}enable --now {name}'"]
    _systemctl(user_unit, "daemon-reload")
    _systemctl(user_unit, "enable", *(["--now"] if start else []), f"{name}.service")
    done.append(f"enabled{' and started' if start else ''} {name}.service")
    if user_unit:
        done.append(f"to start it at boot without logging in: sudo loginctl enable-linger {run_as}")
    return done


def uninstall_systemd(name: str, user_unit: bool) -> list[str]:
    path = unit_path(name, user_unit)
    done = []
    if systemd_running() and path.exists():
        _systemctl(user_unit, "disable", "--now", f"{name}.service")
        done.append(f"stopped and disabled {name}.service")
    if path.exists():
        try:
            path.unlink()
        except PermissionError:
            raise ServiceError(f"cannot remove {path}: run with sudo, or add --user for a user unit") from None
        done.append(f"removed {path}")
        if systemd_running():
            _systemctl(user_unit, "daemon-reload")
    return done or [f"no unit at {path}: nothing to remove"]


def cmd_service(args: argparse.Namespace) -> int:
    from daemon.cli import console, say_error

    home = resolve_home(args.home)
    settings = load_settings(home)
    windows = args.windows or (not args.systemd and sys.platform == "win32")
    try:
        if windows:
            from daemon import winservice

            if args.action == "print":
                console.print(winservice.describe(home, args.name), highlight=False, soft_wrap=True)
                return EXIT_OK
            done = (winservice.install(home, args.name, settings, start=not args.no_start)
                    if args.action == "install" else winservice.uninstall(args.name))
        elif args.action == "print":
            print(systemd_unit(home, settings, args.user, os.environ.get("SUDO_USER") or getpass.getuser()), end="")
            return EXIT_OK
        elif args.action == "install":
            done = install_systemd(home, settings, args.name, args.user, start=not args.no_start)
        else:
            done = uninstall_systemd(args.name, args.user)
    except ServiceError as exc:
        say_error(str(exc))
        return EXIT_FAILED
    for line in done:
        console.print(line, highlight=False, soft_wrap=True)
    return EXIT_OK
