"""A full disk in a stage: a condition that clears, so it must never fail the job.

Side writes (progress, events, metrics lines, rolling checkpoints) are skipped while the disk is full, with
a warning a minute at most; writes a result depends on (final checkpoint, adapter, reports, result.json)
wait for free space, and a stop signal while waiting ends the stage as interrupted (exit 75, resumable).
"""
from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from typing import Callable, TypeVar

from trainbox.errors import StopRequested

log = logging.getLogger(__name__)
T = TypeVar("T")

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
WARN_EVERY_S = 60.0
POLL_S = 2.0
skipped: Counter[str] = Counter()  # what was not written while the disk was full, for the end-of-stage event
_last_warning: dict[str, float] = {}


def out_of_space(exc: BaseException) -> bool:
    """True for 'no space left on device' and 'disk quota exceeded'."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


def _warn(what: str, exc: OSError, consequence: str) -> None:
    now = time.monotonic()
    if now - _last_warning.get(what, -WARN_EVERY_S) >= WARN_EVERY_S:
        _last_warning[what] = now
        log.warning("%s not written: %s; %s", what, exc.strerror or exc, consequence)


def best_effort(what: str, write: Callable[[], T]) -> T | None:
    """``write()``, or None (counted, warned) when the disk is full; any other error propagates."""
    try:
        return write()
    except OSError as exc:
        if not out_of_space(exc):
            raise
        skipped[what] += 1
        _warn(what, exc, "training goes on and writes it again once there is space")
        return None


def until_written(what: str, write: Callable[[], T], should_stop: Callable[[], bool],
                  poll_s: float = POLL_S) -> T:
    """``write()``, retried every ``poll_s`` while the disk is full; StopRequested if a stop arrives meanwhile."""
    waited_since = None
    while True:
        try:
            result = write()
        except OSError as exc:
            if not out_of_space(exc):
                raise
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("%s: %s; waiting for free space (trying again every %.0f s; a stop signal ends the "
                            "stage as interrupted and the job resumes later)", what, exc.strerror or exc, poll_s)
            if should_stop():
                raise StopRequested(f"stopped while waiting for disk space to write {what}") from exc
            time.sleep(poll_s)
            continue
        if waited_since is not None:
            log.warning("%s written after waiting %.0f s for disk space", what, time.monotonic() - waited_since)
            skipped["waits for space"] += 1
        return result


def summary() -> str | None:
    """One sentence on what a full disk cost this stage, or None when it never happened."""
    if not skipped:
        return None
    parts = ", ".join(f"{what} x{n}" for what, n in sorted(skipped.items()))
    return f"the disk was full during this stage ({parts}); free space under the trainbox home"
