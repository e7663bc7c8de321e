"""Train stage: LoRA / QLoRA fine-tuning with atomic checkpoints and exact resume.

Importing this package stays cheap (torch-free); ``run`` loads the heavy modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handlers.context import StageContext
    from trainbox.protocol import StageResult


def run(ctx: "StageContext") -> "StageResult":
    from handlers.train.stage import run_train

    return run_train(ctx)
