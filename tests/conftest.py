"""Shared fixtures: a trainbox home with fast daemon settings, and a real daemon child process."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from daemon.layout import Layout
from daemon.store import Store

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAST_SETTINGS = {
    "watch": {"rescan_seconds": 0.5, "stable_seconds": 0.3},
    "supervisor": {"stop_grace_seconds": 60, "poll_seconds": 0.2},
    "default_job": {"delay_seconds": 0.5, "job": {"base_model": "builtin:tiny", "stages": ["prepare"]}},
    "notify": {"backends": {"desktop": False, "audio": False}},
}


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    Layout(h).create()
    (h / "daemon.yaml").write_text(yaml.safe_dump(FAST_SETTINGS), encoding="utf-8")
    return h


def read_store(home: Path) -> Store:
    return Store.for_home(home, readonly=True)


def jobs_json(home: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "jobs", "--json", "--home", str(home)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)["jobs"]


class DaemonProcess:
    """``trainbox run`` as a real child process on a home."""

    def __init__(self, home: Path, *extra: str):
        self.home = home
        self.log = open(home / "daemon-test.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--home", str(home), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 30) -> "DaemonProcess":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            beat = read_store(self.home).get_meta("daemon") if (self.home / "state/trainbox.json").exists() else None
            return bool(beat and beat.get("pid") == self.proc.pid)
        wait_for(ready, timeout, "daemon heartbeat")
        return self

    def output(self) -> str:
        return (self.home / "daemon-test.log").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon_factory(home: Path):
    started: list[DaemonProcess] = []

    def start(*extra: str, h: Path | None = None) -> DaemonProcess:
        d = DaemonProcess(h or home, *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def drop(inbox: Path, name: str, content: str | bytes) -> Path:
    """Write a file into the inbox the way careful tools do: temp name, then rename."""
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    os.replace(tmp, inbox / name)
    return inbox / name


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """``mount_point`` on its own tmpfs of ``size_mb`` (a real full disk for the test; needs root, as CI has)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """Write a file until the filesystem has no byte left, then give ``leave`` bytes back; deleting the file
    gives the rest back."""
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    if leave:
        with open(filler, "r+b") as fh:
            fh.truncate(filler.stat().st_size - leave)
    return filler
