"""Notifications: one dispatcher (``Notifier``) with desktop, audio and webhook backends."""
from daemon.notify.backends import available_backends
from daemon.notify.dispatcher import Notifier
from daemon.notify.note import EVENTS, Note

__all__ = ["EVENTS", "Note", "Notifier", "available_backends"]
