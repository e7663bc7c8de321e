"""Webhook: one JSON POST per notification, as plain JSON, an ntfy message, or a Slack-compatible payload."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from daemon.config import NotifyBackendSettings
from daemon.notify.note import Note

NTFY_TAGS = {"job_succeeded": "white_check_mark", "model_exported": "package", "job_failed": "x",
             "job_interrupted": "pause_button", "file_rejected": "no_entry", "resource_warning": "warning",
             "job_waiting_too_long": "hourglass"}


def payload(note: Note, fmt: str, url: str) -> tuple[str, dict[str, Any]]:
    """(URL to post to, JSON body) for the configured format."""
    if fmt == "slack":
        return url, {"text": f"*{note.headline()}*\n{note.message}"}
    if fmt == "ntfy":
        # ntfy takes JSON at the server root with the topic in the body: https://ntfy.sh/mytopic -> topic mytopic
        parts = urlsplit(url)
        topic = parts.path.strip("/")
        root = urlunsplit((parts.scheme, parts.netloc, "/", "", ""))
        return root, {"topic": topic, "title": note.headline(), "message": note.message,
                      "tags": [NTFY_TAGS.get(note.event, "bell")], "priority": 3 if note.good else 4}
    return url, {"source": "trainbox", "event": note.event, "title": note.title, "message": note.message,
                 "count": note.count, "time": note.time, "host": socket.gethostname(), "data": note.data}


def probe(settings: NotifyBackendSettings) -> tuple[bool, str]:
    if not settings.webhook_url:
        return False, "not configured (set notify.backends.webhook_url)"
    scheme = urlsplit(settings.webhook_url).scheme
    if scheme not in ("http", "https"):
        return False, f"webhook_url must start with http:// or https://, not {scheme or 'nothing'}"
    return True, f"{settings.webhook_format} POST to {urlsplit(settings.webhook_url).netloc}"


def send(note: Note, settings: NotifyBackendSettings) -> None:
    url, body = payload(note, settings.webhook_format, settings.webhook_url or "")
    req = urllib.request.Request(url, data=json.dumps(body, default=str).encode("utf-8"), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "trainbox"})
    try:
        with urllib.request.urlopen(req, timeout=settings.timeout_seconds) as resp:
            resp.read(4096)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered HTTP {exc.code} {exc.reason}: check webhook_url and "
                           f"webhook_format ({settings.webhook_format})") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"{url} unreachable: {reason}") from None
