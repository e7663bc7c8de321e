"""scenario: the same content in another situation (work / leisure, office / home, calm / excited): the user
turn is framed by the situation and the reply takes its register; kept as ``scenario`` metadata."""
from __future__ import annotations

from typing import TYPE_CHECKING

from handlers.augment.rules import SCENARIO_FRAMES
from handlers.augment.source import Source, generated_row
from trainbox.rows import Example

if TYPE_CHECKING:
    from handlers.augment.techniques import Tools


def generate(source: Source, tools: "Tools") -> list[Example]:
    options = [f"scenario:{s}" for s in tools.spec.scenarios
               if s != source.meta("scenario")]
    targets = tools.pick(source, options)
    last_user = max((i for i, m in enumerate(source.prompt) if m["role"] == "user"), default=None)
    if last_user is None:
        return []
    rows = []
    for target, reply in tools.rewrite_all(source, targets):
        scenario = target.split(":", 1)[1]
        prompt = [dict(m) for m in source.prompt]
        prompt[last_user]["content"] = SCENARIO_FRAMES[scenario][0] + prompt[last_user]["content"]
        rows.append(generated_row(source, "scenario", prompt + [{"role": "assistant", "content": reply}],
                                  tools.provenance("scenario", target), meta={"scenario": scenario},
                                  drop=("style",)))
    return rows
