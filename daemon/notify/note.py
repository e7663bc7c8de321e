"""What a notification is, and how several of the same event are merged into one."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

EVENTS = ("job_succeeded", "job_failed", "job_interrupted", "job_waiting_too_long", "file_rejected",
          "resource_warning", "model_exported")
# how a coalesced group reads: "37 more files rejected"
NOUNS = {"job_succeeded": "jobs succeeded", "job_failed": "jobs failed", "job_interrupted": "jobs interrupted",
         "job_waiting_too_long": "jobs waiting too long", "file_rejected": "files rejected",
         "resource_warning": "resource warnings", "model_exported": "models exported"}
GOOD_EVENTS = ("job_succeeded", "model_exported")


@dataclass
class Note:
    event: str
    title: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    count: int = 1
    time: float = field(default_factory=time.time)
    speak: bool = False  # the job asked for speech (its notify.speak), on top of the daemon's own setting

    @property
    def good(self) -> bool:
        return self.event in GOOD_EVENTS

    def headline(self) -> str:
        """The title with the app name in front (once: callers may have put it there already)."""
        return self.title if self.title.lower().startswith("trainbox") else f"trainbox: {self.title}"

    def sentence(self) -> str:
        """What the speech backend says: short, no punctuation soup."""
        return self.headline().replace(":", ".")[:200]


def coalesce(notes: list[Note], more: bool) -> Note:
    """One note standing for ``notes`` (same event); ``more`` when some of them were already announced."""
    if len(notes) == 1:
        return notes[0]
    last = notes[-1]
    count = sum(n.count for n in notes)
    noun = NOUNS.get(last.event, f"{last.event} events")
    title = f"{count} {'more ' if more else ''}{noun}"
    return Note(last.event, title, f"latest: {last.title}: {last.message}", dict(last.data), count, last.time,
                speak=any(n.speak for n in notes))


def run_command(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    """Run a notifier program; raise RuntimeError with its stderr when it fails or overruns."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{cmd[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {detail[-1] if detail else 'no output'}")
