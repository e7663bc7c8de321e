"""From candidates to the augmented split: score each generated row, drop low quality and duplicates, then take
rows kind by kind in turn until the target size is reached."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from handlers.augment import quality
from handlers.augment.dedup import Deduplicator
from handlers.augment.embeddings import Encoder
from handlers.augment.source import Source
from trainbox.rows import Example


@dataclass
class Selection:
    rows: list[Example]  # chosen generated rows, in source order
    candidates: int
    low_quality: int
    duplicates_exact: int = 0
    duplicates_near: int = 0
    not_needed: int = 0
    levels: Counter[str] = field(default_factory=Counter)


def generated_text(row: Example) -> str:
    """The text a generated row contributes: its reply, or the rejected answer of a pair."""
    return row.rejected if row.rejected is not None else (row.messages or [{}])[-1].get("content", "")


def row_text(row: Example) -> str:
    """The whole row, for duplicate detection (the same reply under another instruction is a new row)."""
    parts = [m["content"] for m in row.messages or []] + [row.chosen or "", row.rejected or ""]
    return "\n".join(p for p in parts if p)


def prompt_text(row: Example) -> str:
    """The turns before the generated text (all turns of a pair row)."""
    turns = row.messages or []
    return "\n".join(m["content"] for m in (turns if row.rejected is not None else turns[:-1]))


def score_rows(rows: list[Example], sources: dict[str, Source], reply_embeddings: dict[str, np.ndarray],
               encoder: Encoder) -> dict[str, np.ndarray]:
    """Write ``quality`` and ``quality_level`` into each row's provenance; the embedding of each row's text."""
    embedded = encoder.encode([generated_text(r) for r in rows])
    for row, emb in zip(rows, embedded):
        provenance = row.meta["provenance"]
        source = sources[row.source_id or ""]
        similarity = provenance.get("similarity")
        if similarity is None:  # a rewrite keeps the meaning of the reply it rewrote
            similarity = float(emb @ reply_embeddings[source.id])
        provenance["quality"] = quality.score(generated_text(row), source.reply, float(similarity))
        provenance["quality_level"] = quality.level(provenance["quality"])
    return {row.id: emb for row, emb in zip(rows, embedded)}


def select(originals: list[Example], candidates: list[Example], embeddings: dict[str, np.ndarray], wanted: int,
           min_quality: float, dedup_cosine: float | None, techniques: list[str]) -> Selection:
    """``wanted`` generated rows (or fewer) from scored ``candidates``; ``embeddings``: of each original's reply
    and each candidate's text, by row id; ``dedup_cosine`` None: no duplicate removal."""
    kept = [r for r in candidates if r.meta["provenance"]["quality"] >= min_quality]
    result = Selection(rows=[], candidates=len(candidates), low_quality=len(candidates) - len(kept))
    if dedup_cosine is not None:
        kept.sort(key=lambda r: (-r.meta["provenance"]["quality"], r.id))  # the best of duplicates survives
        dedup = Deduplicator(dedup_cosine)
        for row in originals:
            dedup.offer(f"o{row.id}", row_text(row), prompt_text(row), embeddings.get(row.id))
        dedup.exact = dedup.near = 0  # count generated rows only
        kept = [r for r in kept if dedup.offer(f"g{r.id}", row_text(r), prompt_text(r), embeddings[r.id])]
        result.duplicates_exact, result.duplicates_near = dedup.exact, dedup.near
    by_kind = {t: sorted((r for r in kept if r.kind == t), key=lambda r: (-r.meta["provenance"]["quality"], r.id))
               for t in techniques}
    chosen: list[Example] = []
    while len(chosen) < wanted and any(by_kind.values()):
        for kind in techniques:
            if by_kind[kind] and len(chosen) < wanted:
                chosen.append(by_kind[kind].pop(0))
    result.not_needed = sum(len(rows) for rows in by_kind.values())
    order = {r.id: i for i, r in enumerate(candidates)}
    result.rows = sorted(chosen, key=lambda r: order[r.id])
    result.levels = Counter(r.meta["provenance"]["quality_level"] for r in result.rows)
    return result
