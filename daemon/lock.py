"""Single-instance lock for a home: an OS file lock on ``state/daemon.lock`` that also holds the pid."""
from __future__ import annotations

import os
from pathlib import Path

from daemon.errors import DaemonAlreadyRunning

if os.name == "nt":
    import msvcrt
else:
    import fcntl


class HomeLock:
    """Held for the daemon's lifetime; the OS releases it if the process dies, so no stale locks."""

    def __init__(self, home: Path):
        self.path = Path(home) / "state" / "daemon.lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            if os.name == "nt":
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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


def lock_is_held(home: Path) -> bool:
    """True when a live daemon holds the home's lock (tested by trying to take it)."""
    lock = HomeLock(home)
    if not lock.path.exists():
        return False
    try:
        lock.acquire()
    except DaemonAlreadyRunning:
        return True
    lock.release()
    return False
