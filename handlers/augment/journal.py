"""The append-only journal of generated rows: one fsynced line per source row, after a header naming what the
rows depend on. A killed run resumes after its last complete line (a torn last line is cut off)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from trainbox.fsio import append_line_durably
from trainbox.rows import Example

log = logging.getLogger(__name__)


class Journal:
    """``rows`` holds the generated rows of the sources done so far, in source order."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.rows: list[Example] = []
        self.done = 0
        if self._load(fingerprint):
            return
        path.unlink(missing_ok=True)
        append_line_durably(path, json.dumps({"fingerprint": fingerprint}))

    def _load(self, fingerprint: str) -> bool:
        """Read a journal left by an earlier run of the same work; False when there is none to continue."""
        if not self.path.is_file():
            return False
        data = self.path.read_bytes()
        good, lines = 0, data.split(b"\n")
        for number, line in enumerate(lines[:-1]):  # the part after the last newline was never completed
            try:
                record = json.loads(line)
            except ValueError:
                break
            if number == 0:
                if record.get("fingerprint") != fingerprint:
                    log.warning("%s was written for other settings or data: starting over", self.path.name)
                    return False
            elif record.get("index") == self.done:
                self.rows += [Example(**row) for row in record["rows"]]
                self.done += 1
            else:
                break
            good += len(line) + 1
        if good == 0:
            return False
        if good < len(data):
            log.warning("%s: cutting %d bytes of an unfinished record", self.path.name, len(data) - good)
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())
        if self.done:
            log.info("resuming augmentation after %d source row(s) (%d rows generated so far)", self.done,
                     len(self.rows))
        return True

    def append(self, index: int, source_id: str, rows: list[Example]) -> None:
        record = {"index": index, "source_id": source_id, "rows": [json.loads(r.to_json()) for r in rows]}
        append_line_durably(self.path, json.dumps(record, ensure_ascii=False, sort_keys=True))
        self.rows += rows
        self.done += 1
