"""The backend table, availability checks for doctor, and one bounded-time delivery attempt."""
from __future__ import annotations

import threading
from types import ModuleType

from daemon.config import NotifyBackendSettings
from daemon.notify import audio, desktop, webhook
from daemon.notify.note import Note

BACKENDS: dict[str, ModuleType] = {"desktop": desktop, "audio": audio, "webhook": webhook}


def configured(settings: NotifyBackendSettings) -> list[str]:
    """Backends the settings turn on (whether or not they work on this machine)."""
    on = {"desktop": settings.desktop, "audio": settings.audio, "webhook": bool(settings.webhook_url)}
    return [name for name in BACKENDS if on[name]]


def available_backends(settings: NotifyBackendSettings | None = None) -> dict[str, tuple[bool, str]]:
    """Backend name -> (works here, why / how). With no settings, every backend is checked as if enabled."""
    if settings is None:
        settings = NotifyBackendSettings(desktop=True, audio=True)
    return {name: mod.probe(settings) for name, mod in BACKENDS.items()}


def deliver(name: str, note: Note, settings: NotifyBackendSettings) -> tuple[bool, str]:
    """Send ``note`` through one backend; never raises, never takes much longer than its timeout."""
    outcome: list[tuple[bool, str]] = []

    def attempt() -> None:
        try:
            BACKENDS[name].send(note, settings)
            outcome.append((True, "sent"))
        except Exception as exc:  # any backend failure is reported, never allowed to reach the daemon
            outcome.append((False, f"{type(exc).__name__}: {exc}"))

    # a thread bounds calls that carry no timeout of their own (plyer, winsound); a hung one is abandoned
    worker = threading.Thread(target=attempt, name=f"notify-{name}", daemon=True)
    worker.start()
    budget = settings.timeout_seconds * 2 + 0.5  # audio may play a chime and then a sentence
    worker.join(budget)
    if not outcome:
        return False, f"timed out after {budget:g}s"
    return outcome[0]
