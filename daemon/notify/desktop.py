"""Desktop pop-ups: plyer where it reports failures, else notify-send, a PowerShell toast, or osascript."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from daemon.config import NotifyBackendSettings
from daemon.notify.note import Note, run_command

# Windows PowerShell's own app id: toasts need a registered id, and this one exists on every Windows 10/11.
_PS_APP_ID = r"{1AC14E77-02E7-4E5D-B744-2EB1AE5198B7}\WindowsPowerShell\v1.0\powershell.exe"
# Title and message travel in environment variables so no quoting of user text is needed.
_TOAST_SCRIPT = (
    "[Windows.UI.Notifications.ToastNotificationManager, Windows.UI.Notifications, ContentType=WindowsRuntime]"
    " > $null; "
    "$t = [Windows.UI.Notifications.ToastNotificationManager]::GetTemplateContent("
    "[Windows.UI.Notifications.ToastTemplateType]::ToastText02); "
    "$x = $t.GetElementsByTagName('text'); "
    "$x.Item(0).AppendChild($t.CreateTextNode($env:TRAINBOX_TITLE)) > $null; "
    "$x.Item(1).AppendChild($t.CreateTextNode($env:TRAINBOX_MESSAGE)) > $null; "
    f"[Windows.UI.Notifications.ToastNotificationManager]::CreateToastNotifier('{_PS_APP_ID}')"
    ".Show([Windows.UI.Notifications.ToastNotification]::new($t))"
)
_OSASCRIPT = "on run argv\ndisplay notification (item 2 of argv) with title (item 1 of argv)\nend run"


def _session_bus() -> bool:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return bool(os.environ.get("DBUS_SESSION_BUS_ADDRESS")) or bool(runtime and (Path(runtime) / "bus").exists())


def _linux_way() -> str | None:
    # plyer's notify-send path ignores the exit code, so plyer is used only with python-dbus (which raises)
    if importlib.util.find_spec("dbus") is not None:
        return "plyer"
    return "notify-send" if shutil.which("notify-send") else None


def probe(settings: NotifyBackendSettings) -> tuple[bool, str]:
    if not settings.desktop:
        return False, "disabled (notify.backends.desktop: false)"
    if sys.platform == "win32":
        return True, "plyer balloon, PowerShell toast as fallback"
    if sys.platform == "darwin":
        return (True, "osascript") if shutil.which("osascript") else (False, "osascript not found")
    if not _session_bus():
        return False, ("no desktop session (DBUS_SESSION_BUS_ADDRESS unset): pop-ups need a logged-in desktop; "
                       "on a server use the webhook backend (e.g. ntfy)")
    way = _linux_way()
    if way is None:
        return False, "neither python-dbus nor notify-send found: install libnotify-bin (apt) or libnotify (dnf)"
    return True, way


def send(note: Note, settings: NotifyBackendSettings) -> None:
    timeout = settings.timeout_seconds
    title = note.headline()
    if sys.platform == "win32":
        try:
            from plyer import notification
            notification.notify(title=title, message=note.message[:250], app_name="trainbox", timeout=10)
            return
        except (ImportError, NotImplementedError, OSError):
            run_command(["powershell", "-NoProfile", "-NonInteractive", "-Command", _TOAST_SCRIPT], timeout,
                        env={"TRAINBOX_TITLE": title, "TRAINBOX_MESSAGE": note.message[:250]})
            return
    if sys.platform == "darwin":
        run_command(["osascript", "-e", _OSASCRIPT, title, note.message[:250]], timeout)
        return
    if _linux_way() == "plyer":
        from plyer import notification
        notification.notify(title=title, message=note.message, app_name="trainbox", timeout=10)
        return
    urgency = "normal" if note.good else "critical"
    run_command(["notify-send", "--app-name=trainbox", f"--urgency={urgency}", title, note.message], timeout)
