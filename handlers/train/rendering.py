"""What the chat template is given for one example: tools, tool calls, tool results, and which turns are learned.

Tools go through the template's own support where it has it (``apply_chat_template(tools=...)``, assistant
``tool_calls``, role ``tool``), found by rendering a probe conversation and looking for it in the output.
Where a template lacks a piece, that content is written as plain text into a turn it does render (tool
schemas into the system turn, calls as the assistant's text, results as a user turn), and the split gets one
warning with counts (``tool_warning``). Nothing is dropped.

An assistant turn with ``loss_weight: 0`` is rendered but not learned.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from handlers.modelio import example_messages, render_chat

log = logging.getLogger(__name__)

PROBE = "zqxprobe"
CALL_ID = "call00001"  # 9 alphanumerics: the strictest templates (Mistral) check the id's shape
TOOLS_HEADER = "You can call these tools (JSON schemas):\n"
RESULT_HEADER = "Tool result:\n"


@dataclass(frozen=True)
class ToolSupport:
    """Which tool pieces the tokenizer's chat template renders."""

    tools: bool
    tool_calls: bool
    tool_role: bool
    system_role: bool

    @property
    def complete(self) -> bool:
        return self.tools and self.tool_calls and self.tool_role


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None

    def render(self, tokenizer: Any, upto: int | None = None, add_generation_prompt: bool = False) -> str:
        """The first ``upto`` turns (all by default) as the template writes them."""
        messages = self.messages if upto is None else self.messages[:upto]
        if self.tools and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def learned(message: dict[str, Any]) -> bool:
    """True for the turns the loss covers: assistant turns without ``loss_weight: 0``."""
    return message["role"] == "assistant" and message.get("loss_weight", 1) != 0


def _renders(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:  # templates raise on what they refuse
        log.debug("chat template refuses the probe: %s", exc)
        return False
    return PROBE in text


_support: dict[str, ToolSupport] = {}


def tool_support(tokenizer: Any) -> ToolSupport:
    """Probe the template once: does each tool piece show up in what it renders?"""
    template = getattr(tokenizer, "chat_template", None)
    if not template:  # the default ``### Role:`` format writes every role, and no tool schemas
        return ToolSupport(tools=False, tool_calls=False, tool_role=True, system_role=True)
    if template not in _support:
        user = {"role": "user", "content": "hi"}
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"id": CALL_ID, "type": "function", "function": {"name": PROBE, "arguments": {}}}]}
        schema = {"type": "function", "function": {"name": PROBE, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}
        call_named_x = {**call, "tool_calls": [{**call["tool_calls"][0], "function": {"name": "x", "arguments": {}}}]}
        result = {"role": "tool", "tool_call_id": CALL_ID, "name": "x", "content": PROBE}
        _support[template] = ToolSupport(
            tools=_renders(tokenizer, [user], [schema]),
            tool_calls=_renders(tokenizer, [user, call]),
            tool_role=_renders(tokenizer, [user, call_named_x, result, {"role": "assistant", "content": "ok"}])
            or _renders(tokenizer, [user, {"role": "assistant", "content": "x"}, {"role": "tool", "content": PROBE}]),
            system_role=_renders(tokenizer, [{"role": "system", "content": PROBE}, user]))
    return _support[template]


def parse_tools(raw: Any) -> list[dict[str, Any]] | None:
    """A row's ``tools`` (list, or that list as JSON text; validated at ingest) as ``tools=`` entries."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else None
    if not raw:
        return None
    return [t if "type" in t else {"type": "function", "function": t} for t in raw]


def _as_tool_call(content: str, index: int) -> list[dict[str, Any]] | None:
    try:
        call = json.loads(content)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return [{"id": f"call{index:05d}", "type": "function",
             "function": {"name": call["name"], "arguments": call.get("arguments", {})}}]


def conversation(tokenizer: Any, example: Any) -> Conversation | None:
    """The messages (and tools) to render for ``example``; None for plain text rows."""
    messages = example_messages(example)
    if messages is None:
        return None
    tools = parse_tools((example.meta or {}).get("tools"))
    tool_turns = any(m.get("tool_call") or m["role"] == "tool" for m in messages)
    if not tools and not tool_turns:
        return Conversation([_plain(m) for m in messages], None)
    support = tool_support(tokenizer)
    out: list[dict[str, Any]] = []
    last_call = None
    for i, m in enumerate(messages):
        if m.get("tool_call") and support.tool_calls:
            calls = _as_tool_call(m["content"], i)
            if calls is not None:
                last_call = calls[0]
                out.append({**_plain(m), "content": "", "tool_calls": calls})
                continue
        if m["role"] == "tool" and not support.tool_role:
            out.append({**_plain(m), "role": "user", "content": RESULT_HEADER + m["content"]})
        elif m["role"] == "tool" and last_call is not None:
            out.append({**_plain(m), "tool_call_id": last_call["id"], "name": last_call["function"]["name"]})
        else:
            out.append(_plain(m))
    if tools and not support.tools:
        out = _tools_as_text(out, tools, support.system_role)
        tools = None
    return Conversation(out, tools)


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """The keys templates know; ``loss_weight`` stays for the loss mask."""
    return {k: v for k, v in message.items() if k in ("role", "content", "loss_weight")}


def _tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                   system_role: bool) -> list[dict[str, Any]]:
    text = TOOLS_HEADER + json.dumps(tools, ensure_ascii=False)
    first = messages[0]
    if first["role"] == "system":
        return [{**first, "content": first["content"] + "\n\n" + text}, *messages[1:]]
    if system_role:
        return [{"role": "system", "content": text}, *messages]
    return [{**first, "content": text + "\n\n" + first["content"]}, *messages[1:]]


def tool_warning(tokenizer: Any, examples: list[Any], split: str) -> str | None:
    """One sentence with counts when rows of ``split`` use tools the template cannot render natively."""
    counts: Counter[str] = Counter()
    for ex in examples:
        messages = ex.messages or []
        counts["rows defining tools"] += bool(parse_tools((ex.meta or {}).get("tools")))
        counts["tool calls"] += sum(1 for m in messages if m.get("tool_call"))
        counts["tool results"] += sum(1 for m in messages if m["role"] == "tool")
    if not any(counts.values()):
        return None
    support = tool_support(tokenizer)
    missing = [what for what, ok, n in (("tool schemas", support.tools, counts["rows defining tools"]),
                                        ("tool calls", support.tool_calls, counts["tool calls"]),
                                        ("the tool role", support.tool_role, counts["tool results"])) if n and not ok]
    found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    if not missing:
        log.info("%s: %s, rendered with the chat template's tool support", split, found)
        return None
    return (f"{split}: {found}; the chat template does not render {', '.join(missing)}, so that content was written "
            "as plain text (schemas into the system turn, calls as the assistant's text, results as a user turn "
            "starting 'Tool result:'); use a base model whose template supports tools to train its native format")
