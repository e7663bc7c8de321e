"""The two rewriting backends behind one call: ``rewrite(requests) -> texts`` (None where nothing usable came)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from handlers.augment import rules
from trainbox.jobspec import AugmentSpec

# what the llm backend is asked for, per target (the rules backend implements the same targets in rules.py)
INSTRUCTIONS = {
    "style:formal": "sounds formal and professional", "style:informal": "sounds casual and relaxed",
    "style:concise": "is as short as possible", "style:detailed": "is more detailed and explains a bit more",
    "style:direct": "is direct and plain, without hedging", "style:tactful": "is tactful, gentle and polite",
    "scenario:work": "fits a conversation at work", "scenario:leisure": "fits a relaxed chat in free time",
    "scenario:office": "fits a quick exchange at the office", "scenario:home": "fits a chat at home",
    "scenario:calm": "sounds calm and measured", "scenario:excited": "sounds excited and enthusiastic",
    "relationship:stranger": "is addressed to a stranger: formal and reserved",
    "relationship:close_friend": "is addressed to a close friend: casual and warm",
    "relationship:authority": "is addressed to a person in authority: careful and polite",
}


@dataclass(frozen=True)
class Request:
    """Rewrite ``text`` (a reply to ``context``) for ``target``."""

    target: str
    text: str
    context: str


class Rewriter(Protocol):
    name: str
    model: str | None

    def rewrite(self, requests: list[Request]) -> list[str | None]: ...


class RulesRewriter:
    """Deterministic, no model."""

    name, model = "rules", None

    def rewrite(self, requests: list[Request]) -> list[str | None]:
        out: list[str | None] = []
        for request in requests:
            text = rules.rewrite(request.target, request.text).strip()
            out.append(text if text and text != request.text.strip() else None)
        return out


def make_rewriter(spec: AugmentSpec, seed: int, cache_dir: Path) -> Rewriter:
    if spec.backend == "rules":
        return RulesRewriter()
    from handlers.augment.llm import LlmRewriter

    return LlmRewriter(spec.llm, seed, cache_dir)
