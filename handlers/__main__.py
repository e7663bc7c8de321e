"""Child-process entry point: ``python -m handlers <stage> <stage-dir>``.

Exit codes: 0 done, 1 failed (traceback in the log), 2 bad input, 75 stopped by a signal and resumable.
Under torchrun (``train.distributed``) every rank runs this; the first rank of each machine writes
``result.json`` and its exit code to ``rank_exit.json``, because torchrun's own exit code only says that
some rank did not exit 0.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from handlers.context import load_context
from handlers.diskspace import best_effort, out_of_space, until_written
from trainbox.errors import InvalidInput, StageFailed, StopRequested
from trainbox.fsio import write_json_atomically
from trainbox.protocol import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, RANK_EXIT_FILE, RESULT_FILE,
                               StageResult, write_record)
from trainbox.stages import STAGES

log = logging.getLogger("handlers")


def install_stop_signals(stop: threading.Event) -> None:
    """Signals only set a flag: the stage finishes its step, checkpoints, and exits 75."""
    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.warning("signal %d again: already stopping, the checkpoint in progress is finished first", signum)
        else:
            log.warning("signal %d: stopping after the current step", signum)
        stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)


def die_with_parent() -> None:
    """Linux: get SIGTERM if the daemon dies, so a killed daemon never leaves a stage writing alone."""
    if not sys.platform.startswith("linux") or "TRAINBOX_PARENT_PID" not in os.environ:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(os.environ["TRAINBOX_PARENT_PID"]):
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl took effect


def rank_env() -> tuple[int, int] | None:
    """(rank, local rank) when torchrun started this process, else None."""
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers", description="Run one trainbox stage.")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("stage_dir", type=Path)
    args = parser.parse_args(argv)
    ranks = rank_env()
    # the ranks share one log: rank 0 tells the story, the others add only warnings and errors
    logging.basicConfig(level=logging.INFO if ranks is None or ranks[0] == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + (f"[rank {ranks[0]}] " if ranks else "")
                        + "%(name)s: %(message)s")
    code = run_stage(args.stage, args.stage_dir, writes_result=ranks is None or ranks[1] == 0)
    if ranks is not None and ranks[1] == 0:
        best_effort(RANK_EXIT_FILE, lambda: write_json_atomically(
            args.stage_dir / RANK_EXIT_FILE, {"exit_code": code, "rank": ranks[0], "pid": os.getpid()}))
    return code


def run_stage(stage: str, stage_dir: Path, writes_result: bool) -> int:
    """Run ``stage`` in ``stage_dir``; the exit code. ``writes_result``: this process writes result.json."""
    faulthandler.enable()  # a crash in native code leaves the Python stack in the log the daemon reports
    stop = threading.Event()
    install_stop_signals(stop)
    die_with_parent()
    ctx = load_context(stage_dir, stop_event=stop)
    module = importlib.import_module(STAGES[stage])
    try:
        result = module.run(ctx)
    except StopRequested as exc:
        log.warning("stage %s stopped: %s", stage, exc)
        return EXIT_INTERRUPTED
    except (InvalidInput, StageFailed) as exc:
        log.error("stage %s failed: %s", stage, exc)
        failed = StageResult(state="failed", error=str(exc))
        if writes_result:
            best_effort(RESULT_FILE, lambda: write_record(stage_dir / RESULT_FILE, failed))
        return EXIT_INVALID if isinstance(exc, InvalidInput) else EXIT_FAILED
    except OSError as exc:
        if not out_of_space(exc):
            log.error("stage %s crashed:\n%s", stage, traceback.format_exc())
            return EXIT_FAILED
        # a full disk clears: interrupted (resumable), never failed
        log.error("stage %s stopped, the disk is full: %s; free space: the daemon resumes the job by itself",
                  stage, exc)
        return EXIT_INTERRUPTED
    except Exception:
        log.error("stage %s crashed:\n%s", stage, traceback.format_exc())
        return EXIT_FAILED
    if not writes_result:
        return EXIT_OK
    try:
        until_written(RESULT_FILE, lambda: write_record(stage_dir / RESULT_FILE, result), ctx.should_stop)
    except StopRequested as exc:
        log.warning("stage %s stopped: %s", stage, exc)
        return EXIT_INTERRUPTED
    log.info("stage %s done: %s", stage, result.message or result.summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
