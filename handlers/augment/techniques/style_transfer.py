"""style_transfer: the same reply in another register (formal / informal, concise / detailed, direct / tactful);
the register is asked for in the system turn and kept as ``style`` metadata."""
from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.augment.source import Source, generated_row, with_instruction
from trainbox.rows import Example

if TYPE_CHECKING:
    from handlers.augment.techniques import Tools

INSTRUCTION = {"formal": "Reply in a formal register.", "informal": "Reply casually.",
               "concise": "Reply briefly.", "detailed": "Reply in detail.", "direct": "Reply directly.",
               "tactful": "Reply tactfully."}


def generate(source: Source, tools: "Tools") -> list[Example]:
    current = source.meta("style")
    options = [f"style:{s}" for s in tools.spec.styles
               if s != current]
    targets = tools.pick(source, options)
    rows = []
    for target, reply in tools.rewrite_all(source, targets):
        style = target.split(":", 1)[1]
        messages = with_instruction(source.prompt, INSTRUCTION[style]) + [{"role": "assistant", "content": reply}]
        rows.append(generated_row(source, "style_transfer", messages, tools.provenance("style_transfer", target),
                                  meta={"style": style}))
    return rows
