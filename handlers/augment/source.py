"""What every technique works on: one train row seen as (prompt turns, reply), and the row it yields."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from trainbox.rows import Example


@dataclass(frozen=True)
class Source:
    """An original train row: the turns before its last assistant reply, and that reply."""

    index: int
    example: Example
    prompt: tuple[dict[str, str], ...]
    reply: str

    @property
    def id(self) -> str:
        return self.example.id

    @property
    def user_text(self) -> str:
        """The last user turn (what the reply answers)."""
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")

    def meta(self, key: str) -> Any:
        return self.example.meta.get(key)


def as_source(index: int, example: Example) -> Source | None:
    """The row as (prompt, reply), or None when it has no assistant reply to rewrite."""
    messages = example.messages or []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not messages[last]["content"].strip():
        return None
    prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:last])
    return Source(index, example, prompt, messages[last]["content"])


def with_instruction(prompt: tuple[dict[str, str], ...], instruction: str,
                     replace: bool = False) -> list[dict[str, str]]:
    """The prompt turns with ``instruction`` added to the system turn (a new one when there is none);
    ``replace``: instead of the system turn (which may name another addressee)."""
    turns = [dict(m) for m in prompt]
    if turns and turns[0]["role"] == "system":
        turns[0]["content"] = instruction if replace else f"{turns[0]['content'].rstrip()}\n{instruction}"
    else:
        turns.insert(0, {"role": "system", "content": instruction})
    return turns


def generated_row(source: Source, kind: str, messages: list[dict[str, str]], provenance: dict[str, Any],
                  meta: dict[str, Any] | None = None, chosen: str | None = None, rejected: str | None = None,
                  drop: tuple[str, ...] = ()) -> Example:
    """A generated row tagged with its kind, its source row and how it was made; its id hashes its content.

    Metadata is the source row's, less ``drop`` (tags the rewrite made untrue), plus ``meta``."""
    body = json.dumps([kind, source.id, messages, chosen, rejected], sort_keys=True, ensure_ascii=False)
    row_meta = {k: v for k, v in source.example.meta.items() if k not in ("provenance", *drop)}
    row_meta.update(meta or {})
    row_meta["provenance"] = provenance
    return Example(id=hashlib.sha256(body.encode()).hexdigest()[:16], format="messages", messages=messages,
                   meta=row_meta, kind=kind, source_id=source.id, chosen=chosen, rejected=rejected)
