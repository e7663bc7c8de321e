"""Validate claimed datasets in a background thread, so a large file never holds the daemon's main loop.

The thread only reads the claim and parses it (``check_dataset``); the main loop collects the results and
does every store write and move itself, in the order the files were claimed.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from trainbox.rows import DatasetInfo, read_examples
from trainbox.untrusted import read_capped, shown_name


def check_dataset(claim: Path, name: str, max_bytes: int) -> DatasetInfo:
    """Read (capped, never through a link) and validate one claimed dataset; raises InvalidInput."""
    info, _ = read_examples(claim, name, data=read_capped(claim, max_bytes, name, "dataset"))
    return info


class DatasetChecker:
    """One daemon thread working through claimed datasets; ``finished`` hands back results in order."""

    def __init__(self, max_bytes: int, wake: threading.Event):
        self.max_bytes = max_bytes
        self.wake = wake
        self.in_flight: set[Path] = set()  # main thread only
        self._todo: queue.Queue[tuple[Path, str]] = queue.Queue()
        self._done: queue.Queue[tuple[Path, str, DatasetInfo | BaseException]] = queue.Queue()
        threading.Thread(target=self._work, name="dataset-check", daemon=True).start()

    def submit(self, claim: Path, name: str) -> None:
        self.in_flight.add(claim)
        self._todo.put((claim, name))

    def finished(self) -> list[tuple[Path, str, DatasetInfo | BaseException]]:
        out = []
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return out
            self.in_flight.discard(item[0])
            out.append(item)

    def _work(self) -> None:
        while True:
            claim, name = self._todo.get()
            try:
                result: DatasetInfo | BaseException = check_dataset(claim, shown_name(name), self.max_bytes)
            except BaseException as exc:  # handed to the main loop, which rejects or retries the claim
                result = exc
            self._done.put((claim, name, result))
            self.wake.set()
