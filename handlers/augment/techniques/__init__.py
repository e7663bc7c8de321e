"""Augmentation techniques: each module has ``generate(source, tools) -> list[Example]``, rows tagged with their
``kind`` and ``source_id``; ``TECHNIQUES`` maps the names in ``augment.techniques`` to them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from handlers.augment.rewriter import Request, Rewriter
from handlers.augment.source import Source
from trainbox.jobspec import AugmentSpec
from trainbox.rows import Example


@dataclass
class Neighbour:
    """Another row whose situation (prompt) is close to a source row's."""

    source: Source
    prompt_cosine: float
    reply_cosine: float


@dataclass
class Tools:
    """What a technique may use: the settings, the rewriting backend and the similar rows of a source."""

    spec: AugmentSpec
    rewriter: Rewriter
    neighbours: Callable[[Source], list[Neighbour]]
    per_technique: int = 1  # variants each technique makes per source row (the target size decides)

    def pick(self, source: Source, options: list[str]) -> list[str]:
        """``per_technique`` of ``options`` for this row, rotating by its id so every option is used evenly."""
        if not options:
            return []
        start = int(source.id[:8], 16) % len(options)
        return [options[(start + j) % len(options)] for j in range(min(len(options), self.per_technique))]

    def provenance(self, technique: str, target: str) -> dict[str, object]:
        return {"technique": technique, "target": target, "backend": self.rewriter.name,
                "model": self.rewriter.model}

    def rewrite_all(self, source: Source, targets: list[str]) -> list[tuple[str, str]]:
        """(target, rewritten reply) for each target the backend produced something new for."""
        texts = self.rewriter.rewrite([Request(t, source.reply, source.user_text) for t in targets])
        return [(t, text) for t, text in zip(targets, texts) if text]


def _table() -> dict[str, Callable[[Source, Tools], list[Example]]]:
    from handlers.augment.techniques import hard_negative, relationship, scenario, style_transfer

    return {"style_transfer": style_transfer.generate, "scenario": scenario.generate,
            "relationship": relationship.generate, "hard_negative": hard_negative.generate}


TECHNIQUES = _table()
