"""Setting a file aside in rejected/ with NAME.error.txt beside it; nothing there is ever replaced."""
from __future__ import annotations

import os
from pathlib import Path

from daemon.status import ERROR_SUFFIX
from trainbox.errors import InvalidInput
from trainbox.fsio import move_without_replacing, write_new_file_durably
from trainbox.untrusted import kept_name, read_capped


def set_aside(rejected: Path, src: Path, name: str, claim_id: str, explanation_text: str) -> Path:
    """Move ``src`` into ``rejected`` under a usable name, its explanation written first; returns the path.

    A name already taken there (an earlier file, or one the user put there) gets the claim id added.
    """
    base = Path(kept_name(name, ERROR_SUFFIX))
    for attempt in range(100):
        tag = "" if attempt == 0 else f".{claim_id}" + (f"-{attempt}" if attempt > 1 else "")
        target = rejected / f"{base.stem}{tag}{base.suffix}"
        explanation = target.with_name(target.name + ERROR_SUFFIX)
        if os.path.lexists(target) or (os.path.lexists(explanation) and not _ours(explanation, claim_id)):
            continue
        try:
            if os.path.lexists(explanation):  # our own, from an attempt a crash cut short
                explanation.unlink()
            write_new_file_durably(explanation, explanation_text.encode("utf-8"))
            move_without_replacing(src, target)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {base} in {rejected}")


def _ours(explanation: Path, claim_id: str) -> bool:
    """Whether an explanation file was written by us for this claim (a crash cut the rejection short)."""
    try:
        head = read_capped(explanation, 4096, explanation.name, "explanation").split(b"\n", 1)[0]
    except (InvalidInput, OSError):
        return False
    return head.startswith(b"# trainbox rejected ") and f"(claim {claim_id})".encode() in head
