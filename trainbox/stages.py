"""The stage table: stage name -> module exposing ``run(ctx) -> StageResult``.

Imported by the daemon (no torch here): a stage is available when its module is listed.
Later stages (augment, sweep) plug in by adding one line.
"""
from __future__ import annotations

STAGES: dict[str, str] = {
    "prepare": "handlers.prepare",
    "train": "handlers.train",
    "evaluate": "handlers.evaluate",
    "augment": "handlers.augment",
    "export": "handlers.export",
    "sweep": "handlers.sweep",  # a sweep's report, once its trials (jobs of their own) have ended
}

