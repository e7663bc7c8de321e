"""Start, signal and identify stage child processes (``python -m handlers <stage> <dir>``)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def start_stage_process(command: list[str], stage_dir: Path, log_path: Path,
                        env_extra: dict[str, str]) -> subprocess.Popen:
    """Start a stage (``daemon.launch.stage_command``) in its own process group so only the daemon decides
    when it gets a signal.

    Must be called from a long-lived thread: Linux's parent-death signal fires when the *thread*
    that forked the child exits.
    """
    env = {**os.environ, **env_extra, "TRAINBOX_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
    kwargs: dict = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # required for CTRL_BREAK_EVENT
    else:
        kwargs["start_new_session"] = True
    with open(log_path, "ab") as log_fh:  # the child keeps its own descriptor
        return subprocess.Popen(command,
                                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(stage_dir), env=env, **kwargs)


def send_stop(proc: subprocess.Popen) -> None:
    """Ask a stage to checkpoint and exit (SIGTERM; CTRL_BREAK on Windows)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        proc.send_signal(signal.CTRL_BREAK_EVENT)
    else:
        proc.send_signal(signal.SIGTERM)


def kill_stage(proc: subprocess.Popen) -> None:
    """SIGKILL a stage that did not stop in time, with its whole process group (a distributed stage's ranks)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        proc.kill()
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made the stage its group's leader
    except ProcessLookupError:
        pass


def is_stage_process(pid: int | None, stage_dir: Path) -> bool:
    """True when ``pid`` is a live stage process working in ``stage_dir`` (not a reused pid)."""
    if not pid:
        return False
    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "handlers" in cmd and str(stage_dir) in cmd


def stop_orphan(pid: int, grace: float) -> None:
    """Stop a stage left running by a daemon that died: SIGTERM, wait for its checkpoint, then kill."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)
        proc.wait(timeout=grace)
    except psutil.TimeoutExpired:
        log.warning("orphaned stage %d did not stop in %.0fs; killing it", pid, grace)
        proc.kill()
    except psutil.NoSuchProcess:
        pass


def log_tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()[-64_000:]
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, stripped ("" if there is none)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGKILL": " (the system may have run out of memory)",
                "SIGSEGV": " (a crash inside native code such as torch or llama.cpp)",
                "SIGABRT": " (native code aborted)"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def failure_message(stage: str, code: int, result_error: str | None, log_path: Path, lines: int) -> str:
    """Why a stage failed, never empty: a stage killed by a signal writes no result, so its log's last line
    (e.g. Python's "Fatal Python error: Segmentation fault") stands in for it; then the log tail."""
    tail = log_tail(log_path, lines)
    last = last_line(tail)
    detail = result_error or (f"its log ends with: {last}" if last else f"{log_path.name} is empty")
    return f"stage {stage} {describe_exit(code)}: {detail}\n--- last lines of {log_path} ---\n{tail}"
