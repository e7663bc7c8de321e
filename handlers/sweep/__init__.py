"""Sweep stage: the report of a finished sweep (its trials ran as jobs of their own, driven by the daemon).

Importing this package stays cheap; ``run`` loads optuna and matplotlib.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handlers.context import StageContext
    from trainbox.protocol import StageResult


def run(ctx: "StageContext") -> "StageResult":
    from handlers.sweep.report import write_sweep_report

    return write_sweep_report(ctx)
