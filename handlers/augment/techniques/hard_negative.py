"""hard_negative: for a row, replies close in meaning but wrong for it, as preference pairs (``chosen`` = its
reply, ``rejected`` = the negative; never a plain target):

- another user's reply to the most similar situation (nearest prompt by sentence embedding whose reply differs);
- a register mismatch: its own reply rewritten for the opposite addressee or style, when the row names one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.augment.source import Source, generated_row
from trainbox.rows import Example

if TYPE_CHECKING:
    from handlers.augment.techniques import Tools

# a reply this close to the row's own says the same thing: not wrong, so no negative
SAME_REPLY_COSINE = 0.9
MISMATCH = {"stranger": "style:informal", "close_friend": "style:formal", "authority": "relationship:close_friend",
            "formal": "style:informal", "informal": "style:formal", "concise": "style:detailed",
            "detailed": "style:concise", "direct": "style:tactful", "tactful": "style:direct"}


def generate(source: Source, tools: "Tools") -> list[Example]:
    prompt = [dict(m) for m in source.prompt]
    rows = []
    for neighbour in tools.neighbours(source):
        if neighbour.reply_cosine < SAME_REPLY_COSINE and neighbour.source.reply.strip() != source.reply.strip():
            provenance = {"technique": "hard_negative", "target": "similar_situation", "backend": "embedding",
                          "negative_from": neighbour.source.id, "similarity": round(neighbour.prompt_cosine, 4)}
            rows.append(generated_row(source, "hard_negative", prompt, provenance, chosen=source.reply,
                                      rejected=neighbour.source.reply))
            break
    tag = source.meta("relationship") or source.meta("style")
    target = MISMATCH.get(str(tag)) if tag else None
    if target:
        for _target, reply in tools.rewrite_all(source, [target]):
            rows.append(generated_row(source, "hard_negative", prompt, tools.provenance("hard_negative", target),
                                      chosen=source.reply, rejected=reply))
    return rows
