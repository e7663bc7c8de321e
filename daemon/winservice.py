"""The Windows service (pywin32). Its stop takes the same path as SIGTERM: ``daemon.app.request_stop()``.

Imports cleanly without pywin32 (on Linux, or before ``pip install pywin32``); only the service class needs it.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from daemon.config import DaemonSettings, load_settings

try:
    import servicemanager
    import win32service
    import win32serviceutil
except ImportError:  # not Windows, or pywin32 missing: install() says how to get it
    win32serviceutil = None

log = logging.getLogger(__name__)
HOME_OPTION = "home"  # stored in the service's registry key, read back by SvcDoRun
PYWIN32_FIX = ("pywin32 is not installed: pip install 'trainbox[windows]' (or pip install pywin32), then run "
               "'python -m pywin32_postinstall -install' as administrator; or use NSSM instead (see docs/operations.md)")


def run_service(home: Path, started: threading.Event | None = None) -> int:
    """What the service runs: the daemon with its log file, until ``stop_service()``."""
    from daemon.app import run_daemon
    from daemon.cli import setup_logging
    from daemon.layout import Layout

    if sys.stderr is None:  # a service has no console; the log file under logs/ is where output goes
        sys.stderr = open(os.devnull, "w", encoding="utf-8")
    setup_logging(False, Layout(home).logs / "daemon.log")
    if started is not None:
        started.set()
    return run_daemon(home, load_settings(home))


def stop_service() -> None:
    """The service's stop request: the same graceful path as SIGTERM (stages checkpoint, then exit)."""
    from daemon.app import request_stop

    request_stop()


def describe(home: Path, name: str) -> str:
    from daemon.service import daemon_command, stop_timeout_seconds

    return "\n".join([
        f"service name   {name}",
        f"runs           {' '.join(daemon_command(home))} (inside pythonservice.exe)",
        f"home           {home}",
        "start          automatic (at boot)",
        f"stop wait      {stop_timeout_seconds(load_settings(home))} s (stages write an emergency checkpoint)",
        f"logs           {home / 'logs' / 'daemon.log'} and the Windows Event Log (source {name})",
    ])


def install(home: Path, name: str, settings: DaemonSettings, start: bool = True) -> list[str]:
    from daemon.service import ServiceError

    if win32serviceutil is None:
        raise ServiceError(PYWIN32_FIX)
    try:
        win32serviceutil.InstallService(
            win32serviceutil.GetServiceClassString(TrainboxService), name, f"trainbox daemon ({name})",
            startType=win32service.SERVICE_AUTO_START,
            description=f"Watches {home / 'inbox'} and trains, evaluates and exports models.")
        win32serviceutil.SetServiceCustomOption(name, HOME_OPTION, str(home))
        done = [f"installed Windows service {name} for {home}"]
        if start:
            win32serviceutil.StartService(name)
            done.append(f"started {name}")
    except Exception as exc:  # pywintypes.error: access denied, already exists, ...
        raise ServiceError(f"installing service {name} failed: {exc}; run from an administrator prompt, "
                           f"or 'trainbox service uninstall --windows --name {name}' first") from None
    return done


def uninstall(name: str) -> list[str]:
    from daemon.service import ServiceError

    if win32serviceutil is None:
        raise ServiceError(PYWIN32_FIX)
    try:
        try:
            win32serviceutil.StopService(name)  # waits for the graceful stop
        except Exception as exc:  # not running is fine
            log.debug("stop %s: %s", name, exc)
        win32serviceutil.RemoveService(name)
    except Exception as exc:
        raise ServiceError(f"removing service {name} failed: {exc}; run from an administrator prompt") from None
    return [f"removed Windows service {name}"]


if win32serviceutil is not None:
    class TrainboxService(win32serviceutil.ServiceFramework):
        _svc_name_ = "trainbox"
        _svc_display_name_ = "trainbox daemon"

        def __init__(self, args: list[str]):
            super().__init__(args)
            # args[0] is the name the service was installed under (--name), which keys its stored home
            self.home = Path(win32serviceutil.GetServiceCustomOption(args[0], HOME_OPTION) or Path.cwd())

        def SvcDoRun(self) -> None:  # noqa: N802 (pywin32 names)
            servicemanager.LogInfoMsg(f"trainbox: starting on {self.home}")
            code = run_service(self.home)
            servicemanager.LogInfoMsg(f"trainbox: stopped (exit {code})")

        def SvcStop(self) -> None:  # noqa: N802
            from daemon.service import stop_timeout_seconds

            # tell the service manager how long the emergency checkpoint may take, so it does not give up early
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING,
                                     waitHint=stop_timeout_seconds(load_settings(self.home)) * 1000)
            stop_service()


if __name__ == "__main__" and win32serviceutil is not None:
    win32serviceutil.HandleCommandLine(TrainboxService, argv=sys.argv)
