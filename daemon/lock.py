"""Single-instance lock for a home: an OS file lock on ``state/daemon.lock`` that also holds the pid."""
from __future__ import annotations

import os
import time
from pathlib import Path

from trainbox.errors import DaemonAlreadyRunning

if os.name == "nt":
    import msvcrt
else:
    import fcntl


class HomeLock:
    """Held for the daemon's lifetime; the OS releases it if the process dies, so no stale locks."""

    def __init__(self, home: Path):
        self.path = Path(home) / "state" / "daemon.lock"
        self._fh = None

    def acquire(self, patience: float = 1.0) -> None:
        """Take the lock; retry for ``patience`` seconds (a status probe may hold it for microseconds)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        deadline = time.monotonic() + patience
        while not _try_lock(fh):
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            fh.close()
            pid = read_lock_pid(self.path)
            raise DaemonAlreadyRunning(
                f"another trainbox daemon (pid {pid or 'unknown'}) is already running on home "
                f"{self.path.parent.parent}; stop it first (trainbox status shows it), or use another --home"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "HomeLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_pid(path: Path) -> int | None:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _try_lock(fh) -> bool:
    try:
        if os.name == "nt":
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_is_held(home: Path) -> bool:
    """True when a live daemon holds the home's lock; probes without writing the file."""
    path = Path(home) / "state" / "daemon.lock"
    try:
        fh = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        return False
    with fh:
        if not _try_lock(fh):
            return True
        if os.name == "nt":
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False
