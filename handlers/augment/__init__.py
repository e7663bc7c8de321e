"""Augment stage: more and harder training rows from the train split (docs/augment.md).

Importing this package stays cheap (torch-free); ``run`` loads the heavy modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handlers.context import StageContext
    from trainbox.protocol import StageResult


def run(ctx: "StageContext") -> "StageResult":
    from handlers.augment.stage import run_augment

    return run_augment(ctx)
