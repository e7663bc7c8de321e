"""``python -m handlers.torchrun ARGS``: torchrun (``torch.distributed.run``) as one stage process for the daemon.

- Its exit code is the stage's: the one the first rank on this machine wrote to ``rank_exit.json`` (0, 1, 2,
  or 75 stopped and resumable). torchrun's own only says that some rank did not exit 0.
- The Linux parent-death signal reaches torchrun, which forwards it to every rank; the ranks check their
  parent (this process) instead of the daemon.
ARGS are torchrun's, ending with ``-m handlers STAGE STAGE_DIR``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from handlers.__main__ import die_with_parent
from trainbox.protocol import EXIT_FAILED, RANK_EXIT_FILE

log = logging.getLogger("handlers.torchrun")


def rank_exit_code(stage_dir: Path) -> int | None:
    try:
        return int(json.loads((stage_dir / RANK_EXIT_FILE).read_text(encoding="utf-8"))["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    os.environ["TRAINBOX_PARENT_PID"] = str(os.getpid())  # the ranks' parent is this process
    stage_dir = Path(argv[-1])
    (stage_dir / RANK_EXIT_FILE).unlink(missing_ok=True)  # an earlier attempt's code must not be read
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as exc:  # its summary names each failed rank, its exit code or signal
        log.error("torchrun: a rank did not exit 0:\n%s", exc)
    except SignalException as exc:
        log.warning("torchrun: %s; every rank was asked to stop", exc)
    code = rank_exit_code(stage_dir)
    if code is None:
        log.error("the first rank wrote no %s (it was killed or never started); see the lines above", RANK_EXIT_FILE)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
