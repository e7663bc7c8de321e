"""relationship: the same content addressed to another person (stranger: formal and reserved; close friend:
casual; authority: careful and polite); the addressee is named in the system turn and kept as metadata."""
from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.augment.source import Source, generated_row, with_instruction
from trainbox.rows import Example

if TYPE_CHECKING:
    from handlers.augment.techniques import Tools

INSTRUCTION = {"stranger": "You are talking to a stranger.", "close_friend": "You are talking to a close friend.",
               "authority": "You are talking to someone in authority (a manager, a teacher, an official)."}


def generate(source: Source, tools: "Tools") -> list[Example]:
    options = [f"relationship:{r}" for r in tools.spec.relationships
               if r != source.meta("relationship")]
    targets = tools.pick(source, options)
    rows = []
    for target, reply in tools.rewrite_all(source, targets):
        relationship = target.split(":", 1)[1]
        messages = with_instruction(source.prompt, INSTRUCTION[relationship], replace=True)
        rows.append(generated_row(source, "relationship", messages + [{"role": "assistant", "content": reply}],
                                  tools.provenance("relationship", target), meta={"relationship": relationship},
                                  drop=("style", "user")))
    return rows
