"""``trainbox top`` for real: a live daemon training a tiny model, the view in an 80x24 tmux pane."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import drop, wait_for

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXIT_MARK = "trainbox-top-exit="
JOB = """name: toplive
datasets: pc.jsonl
stages: [prepare, train]
train:
  max_steps: 5000
  batch_size: 2
  checkpoint:
    interval_seconds: 3600
"""


def _tmux_or_skip() -> str:
    found = shutil.which("tmux")
    if found:
        return found
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", "tmux"], capture_output=True, text=True,
                              timeout=180)
        if proc.returncode == 0 and shutil.which("tmux"):
            return shutil.which("tmux")
        pytest.skip(f"tmux missing and apt-get install tmux failed: {proc.stderr.strip()[-200:]}")
    pytest.skip("tmux is not installed and cannot be installed here (needs apt-get as root)")


class Pane:
    """A detached tmux session on its own server socket, so no user's tmux is touched."""

    def __init__(self, tmux: str, command: list[str]):
        self.base = [tmux, "-L", f"trainbox-test-{os.getpid()}"]
        # the shell prints the exit status: tmux's #{pane_dead_status} is not always filled in (tmux 3.3)
        shell = " ".join(map(_quote, command)) + f"; echo {EXIT_MARK}$?; sleep 600"
        subprocess.run(self.base + ["new-session", "-d", "-s", "top", "-x", "80", "-y", "24", shell],
                       check=True, cwd=REPO)

    def text(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p", "-t", "top"], capture_output=True, text=True,
                              check=True).stdout

    def interrupt(self) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "top", "C-c"], check=True)

    def exit_status(self) -> int | None:
        """The exit status of the command once it ended (printed by the shell around it), else None."""
        found = re.search(rf"{EXIT_MARK}(\d+)", self.text())
        return int(found.group(1)) if found else None

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.mark.slow
def test_top_in_tmux_against_a_running_daemon(home, daemon_factory):
    tmux = _tmux_or_skip()
    daemon = daemon_factory().wait_ready()
    drop(home / "inbox", "broken.jsonl", "this is not json\n")
    drop(home / "inbox", "pc.jsonl", (FIXTURES / "prompt_completion.jsonl").read_text())
    drop(home / "inbox", "toplive.yaml", JOB)
    pane = Pane(tmux, [sys.executable, "-m", "daemon.cli", "top", "--home", str(home)])
    try:
        def training() -> str | None:
            text = pane.text()
            return text if re.search(r"\d+/5000", text) and "loss " in text else None
        first = wait_for(training, 90, "top to show the training job's progress")
        step1 = int(re.search(r"(\d+)/5000", first).group(1))
        later = wait_for(lambda: (t := pane.text()) and int(re.search(r"(\d+)/5000", t).group(1)) > step1 and t,
                         30, "the view to refresh with a later step")
        pane.interrupt()
        wait_for(lambda: pane.exit_status() is not None, 10, "top to exit on Ctrl-C")
        assert pane.exit_status() == 0
    finally:
        pane.close()
        assert daemon.stop() == 0

    lines = later.rstrip("\n").split("\n")
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, later
    for expected in ("trainbox top", f"running pid {daemon.proc.pid}", "watching inbox/", "running 1",
                     "toplive", "train 2/2", "tok/s", "eta ", "loss ", "queue empty", "events",
                     "rejected files (1", "broken.jsonl 1 bad line(s); nothing was imported"):
        assert expected in later, f"{expected!r} missing from the pane:\n{later}"
    assert "gpu no GPU" in later or re.search(r"gpu0 .* util \d+%", later), later
    assert re.search(r"loss [▁▂▃▄▅▆▇█]+ \d+\.\d{4}", later), later


def test_top_prints_one_frame_when_not_a_terminal(home, daemon_factory):
    daemon = daemon_factory().wait_ready()
    drop(home / "inbox", "broken.jsonl", "{oops\n")
    wait_for(lambda: (home / "rejected" / "broken.jsonl.error.txt").exists(), 30, "the rejection")
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", "top", "--home", str(home)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert daemon.stop() == 0
    assert proc.returncode == 0, proc.stderr
    assert f"running pid {daemon.proc.pid}" in proc.stdout and "broken.jsonl" in proc.stdout
    assert "\x1b[?1049h" not in proc.stdout  # no alternate screen when piped
