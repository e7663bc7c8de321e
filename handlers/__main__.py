"""Child-process entry point: ``python -m handlers <stage> <stage-dir>``.

Exit codes: 0 done, 1 failed (traceback in the log), 2 bad input, 75 stopped by a signal and resumable.
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
from trainbox.protocol import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, RESULT_FILE, StageResult,
                               write_record)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers", description="Run one trainbox stage.")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("stage_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a crash in native code leaves the Python stack in the log the daemon reports
    stop = threading.Event()
    install_stop_signals(stop)
    die_with_parent()
    ctx = load_context(args.stage_dir, stop_event=stop)
    module = importlib.import_module(STAGES[args.stage])
    try:
        result = module.run(ctx)
    except StopRequested as exc:
        log.warning("stage %s stopped: %s", args.stage, exc)
        return EXIT_INTERRUPTED
    except (InvalidInput, StageFailed) as exc:
        log.error("stage %s failed: %s", args.stage, exc)
        failed = StageResult(state="failed", error=str(exc))
        best_effort(RESULT_FILE, lambda: write_record(args.stage_dir / RESULT_FILE, failed))
        return EXIT_INVALID if isinstance(exc, InvalidInput) else EXIT_FAILED
    except OSError as exc:
        if not out_of_space(exc):
            log.error("stage %s crashed:\n%s", args.stage, traceback.format_exc())
            return EXIT_FAILED
        # a full disk clears: interrupted (resumable), never failed
        log.error("stage %s stopped, the disk is full: %s; free space: the daemon resumes the job by itself",
                  args.stage, exc)
        return EXIT_INTERRUPTED
    except Exception:
        log.error("stage %s crashed:\n%s", args.stage, traceback.format_exc())
        return EXIT_FAILED
    try:
        until_written(RESULT_FILE, lambda: write_record(args.stage_dir / RESULT_FILE, result), ctx.should_stop)
    except StopRequested as exc:
        log.warning("stage %s stopped: %s", args.stage, exc)
        return EXIT_INTERRUPTED
    log.info("stage %s done: %s", args.stage, result.message or result.summary)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
