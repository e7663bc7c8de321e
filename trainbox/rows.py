"""Dataset row formats: detect, validate and normalise JSONL rows into one canonical ``Example``.

Pure Python (no torch): the daemon validates with it at ingest, the stages read its output.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from trainbox.errors import InvalidInput, Problem
from trainbox.yamlmodel import decode_utf8

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca", "classification", "text", "preference", "kto")
# what produced a row (the augment stage sets it) and the loss term that trains it (train.loss_weights)
ROW_KINDS = ("original", "style_transfer", "scenario", "relationship", "hard_negative", "preference")
# scenario rows are rewrites like style transfers: weighted as style so generated rows never outweigh the originals
LOSS_TERM_OF_KIND = {"original": "generation", "scenario": "style", "style_transfer": "style",
                     "relationship": "relationship", "hard_negative": "contrastive", "preference": "contrastive"}
THINK_KEYS = ("task", "safety", "policy")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
CHAT_ROLES = {"system", "user", "assistant", "tool"}
MAX_REPORTED = 20
TOO_DEEP = "values are nested too deeply (Python's JSON reader stops near 1000 levels)"
FORMAT_HELP = (
    "each line must be one JSON object in one of these formats: "
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
    '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}, '
    '{"prompt": "...", "completion": "..."}, {"instruction": "...", "input": "...", "output": "..."}, '
    '{"text": "...", "label": "ALLOW"} or {"text": "..."}; preference pairs: '
    '{"conversations": [...], "chosen": {"from": "gpt", "value": "..."}, "rejected": {...}}, '
    '{"prompt": "...", "chosen": "...", "rejected": "..."} or {"messages": [...], "chosen": "...", "rejected": "..."}; '
    'KTO: {"messages": [..., {"role": "assistant", "content": "..."}], "label": true}'
)
PAIR_KINDS = ("hard_negative", "preference")


@dataclass
class Example:
    """One training row in canonical form (what ``prepare`` writes to its split files)."""

    id: str
    format: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    label: str | None = None
    think: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # provenance and preference pairs: ``kind`` is one of ROW_KINDS; ``source_id`` the id of the row a generated
    # row was made from; a pair row ("hard_negative", "preference") holds the prompt turns in ``messages`` (ending
    # with the user turn) and the two answers in ``chosen`` / ``rejected``
    kind: str = "original"
    source_id: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> "Example":
        return cls(**json.loads(line))


@dataclass
class DatasetInfo:
    """What ingest learned about a valid dataset file."""

    format: str
    rows: int
    labels: dict[str, int]
    sha256: str
    bytes: int
    notes: list[str] = field(default_factory=list)  # what was done to rows on the way in (said in the logs)


def classification_target(label: str, think: dict[str, str] | None) -> str:
    """The text a classifier is trained to emit: quadruple-thinking sections, then ``<final>``."""
    if not think:
        return label
    parts = [f"<think-{k}>{think[k]}</think-{k}>" for k in THINK_KEYS if think.get(k)]
    return "".join(parts) + f"<final>{label}</final>"


def detect_format(row: dict) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if isinstance(row.get("label"), bool) and ("messages" in row or "completion" in row):
        return "kto"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "label" in row and ("text" in row or "prompt" in row) and "completion" not in row:
        return "classification"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "output" in row and ("instruction" in row or "input" in row):
        return "alpaca"
    if "text" in row:
        return "text"
    return None


class RowError(ValueError):
    """A row that has a recognised format but wrong contents."""


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise RowError(f"{where}: only text parts are supported (got {part!r:.60})")
            value = part.get("text", part.get("value"))
            if not isinstance(value, str):
                raise RowError(f"{where}: a text part needs a string 'text'")
            texts.append(value)
        return "".join(texts)
    raise RowError(f"{where}: content must be a string or a list of text parts")


def _need_str(row: dict, key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise RowError(f"'{key}' is empty")
    return value


def _messages(turns: Any, key: str, role_key: str, text_key: str, roles: dict[str, str],
              prompt_only: bool = False) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise RowError(f"'{key}' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"{key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise RowError(f"{key}[{i}].{role_key} is {turn.get(role_key)!r}; use one of {sorted(roles)}")
        message: dict[str, Any] = {"role": role, "content": _text_of(turn.get(text_key), f"{key}[{i}].{text_key}")}
        if turn.get(role_key) == "function_call":
            message["tool_call"] = True  # rendered as the template's tool call where it has one
        if _loss_weight(turn, f"{key}[{i}]", role) == 0 and role == "assistant":
            message["loss_weight"] = 0  # a turn shown to the model but not learned
        out.append(message)
    if prompt_only:
        if out[-1]["role"] not in ("user", "tool"):
            raise RowError(f"'{key}' of a preference pair must end with the user turn that 'chosen' and "
                           f"'rejected' answer (it ends with a {out[-1]['role']} turn)")
        return out
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(f"'{key}' has no assistant turn to learn from")
    return out


def _answer(value: Any, key: str) -> str:
    """One side of a preference pair: a string, a turn ({"from": "gpt", "value"} or {"role": "assistant",
    "content"}) or a list holding that one assistant turn."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and ("value" in value or "content" in value):
        role = value.get("from", value.get("role", "assistant"))
        if SHAREGPT_ROLES.get(role) != "assistant":
            raise RowError(f"'{key}' must be the assistant's answer (its role is {role!r})")
        text = _text_of(value.get("value", value.get("content")), key)
    else:
        raise RowError(f"'{key}' must be the answer: a string, an assistant turn such as "
                       '{"from": "gpt", "value": "..."}, or a list holding that one turn')
    if not text.strip():
        raise RowError(f"'{key}' is empty")
    return text


def _preference(row: dict, ex: "Example") -> set[str]:
    """Fill a pair row: the prompt turns (ending with the user turn) and the two answers."""
    if "chosen" not in row or "rejected" not in row:
        raise RowError("a preference pair needs both 'chosen' and 'rejected'")
    if "conversations" in row:
        ex.messages = _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, True)
        used = {"conversations"}
    elif "messages" in row:
        ex.messages = _messages(row["messages"], "messages", "role", "content", {r: r for r in CHAT_ROLES}, True)
        used = {"messages"}
    elif "prompt" in row:
        prompt = row["prompt"]
        ex.messages = ([{"role": "user", "content": _need_str(row, "prompt")}] if not isinstance(prompt, list)
                       else _messages(prompt, "prompt", "role", "content", {r: r for r in CHAT_ROLES}, True))
        used = {"prompt"}
    else:
        raise RowError("a preference pair needs its prompt: 'conversations', 'messages' or 'prompt'")
    ex.chosen, ex.rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    if ex.chosen.strip() == ex.rejected.strip():
        raise RowError("'chosen' and 'rejected' are the same answer: the pair teaches nothing; drop the row")
    ex.kind = "preference"
    return used | {"chosen", "rejected"}


def _kto(row: dict, ex: "Example") -> set[str]:
    """A KTO row: one answer and whether it is desirable (``label``); paired up in ``pair_kto_rows``."""
    if "messages" in row:
        ex.messages = _messages(row["messages"], "messages", "role", "content", {r: r for r in CHAT_ROLES})
        if ex.messages[-1]["role"] != "assistant":
            raise RowError("a KTO row's 'messages' must end with the assistant answer that 'label' judges")
        used = {"messages"}
    else:
        ex.messages = [{"role": "user", "content": _need_str(row, "prompt", True)},
                       {"role": "assistant", "content": _need_str(row, "completion")}]
        used = {"prompt", "completion"}
    ex.label = "desirable" if row["label"] else "undesirable"
    return used | {"label"}


def _loss_weight(turn: dict, where: str, role: str) -> float | None:
    """LLaMA-Factory's per-turn ``loss_weight``: 0 masks the turn, 1 learns it (assistant turns only)."""
    if "loss_weight" not in turn:
        return None
    weight = turn["loss_weight"]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RowError(f"{where}.loss_weight is {weight!r}; trainbox masks a turn (0) or learns it (1), "
                       "partial weights are not supported")
    if weight == 1 and role != "assistant":
        raise RowError(f"{where}.loss_weight is 1 on a {role} turn; only assistant turns are learned: "
                       "set it to 0 or remove it")
    return float(weight)


def _check_tools(row: dict) -> None:
    """``tools``: a list of function schemas, or that list as a JSON string (LLaMA-Factory's sharegpt)."""
    tools = row["tools"]
    if isinstance(tools, str):
        if not tools.strip():
            return
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError) as exc:  # bad JSON, too-long integers, absurd nesting
            reason = getattr(exc, "msg", None) or str(exc)[:100] or type(exc).__name__
            raise RowError(f"'tools' is a string but not usable JSON ({reason}); give a list of function schemas") \
                from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("'tools' must be a list of function schemas (objects with 'name' and 'parameters')")


def normalize_row(row: dict, fmt: str) -> Example:
    """Turn one parsed row of format ``fmt`` into an ``Example``; raises RowError."""
    used: set[str]
    ex = Example(id="", format=fmt)
    if fmt == "messages":
        ex.messages = _messages(row["messages"], "messages", "role", "content", {r: r for r in CHAT_ROLES})
        used = {"messages"}
    elif fmt == "preference":
        used = _preference(row, ex)
    elif fmt == "kto":
        used = _kto(row, ex)
    elif fmt == "sharegpt":
        ex.messages = _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        used = {"conversations"}
    elif fmt == "prompt_completion":
        ex.prompt, ex.completion = _need_str(row, "prompt", True), _need_str(row, "completion")
        used = {"prompt", "completion"}
    elif fmt == "alpaca":
        instruction = row.get("instruction", "")
        extra = row.get("input", "")
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise RowError("'instruction' and 'input' must be strings")
        user = "\n\n".join(s for s in (instruction, extra) if s.strip())
        if not user:
            raise RowError("'instruction' and 'input' are both empty")
        ex.messages = [{"role": "user", "content": user},
                       {"role": "assistant", "content": _need_str(row, "output")}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            ex.messages.insert(0, {"role": "system", "content": row["system"]})
        used = {"instruction", "input", "output", "system"}
    elif fmt == "classification":
        key = "text" if "text" in row else "prompt"
        ex.text = _need_str(row, key)
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise RowError("'label' must be a non-empty string (e.g. ALLOW, DENY)")
        ex.label = str(label).strip()
        ex.think = _think(row.get("think"))
        used = {key, "label", "think"}
    elif fmt == "text":
        ex.text = _need_str(row, "text")
        used = {"text"}
    else:
        raise RowError(f"unknown format {fmt}")
    if fmt in ("messages", "sharegpt", "preference") and "tools" in row:
        _check_tools(row)  # kept in meta; the train stage renders it
    ex.meta = {k: v for k, v in row.items() if k not in used}
    ex.id = hashlib.sha256(json.dumps([fmt, row], sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return ex


def _think(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise RowError("'think' must be an object with 'task', 'safety' and 'policy' strings")
    unknown = set(value) - set(THINK_KEYS)
    if unknown:
        raise RowError(f"'think' has unknown keys {sorted(unknown)}; allowed: {list(THINK_KEYS)}")
    if not all(isinstance(v, str) for v in value.values()):
        raise RowError("'think' values must be strings")
    return {k: value[k] for k in THINK_KEYS if k in value}


def iter_lines(name: str, data: bytes) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line; UTF-8 with or without BOM, LF or CRLF.

    Lines end at \n only: U+2028, U+2029 and U+0085 are legal raw inside JSON strings.
    """
    text = decode_utf8(name, data)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip(" \t\r"):
            yield number, line


def _json_problem(line: str, exc: ValueError | RecursionError) -> Problem:
    """A line ``json.loads`` refused, explained; the cases are valid-looking JSON Python cannot hold."""
    if isinstance(exc, json.JSONDecodeError):
        return Problem(f"not valid JSON: {exc.msg}", column=exc.colno, fix="each line must be one complete JSON object")
    if isinstance(exc, RecursionError):
        return Problem(TOO_DEEP, column=_deepest_column(line), fix="flatten the row: training rows need a few "
                                                                 "levels of nesting")
    digits = re.search(r"\d{4301,}", line)
    if digits:
        return Problem(f"a number with {len(digits.group())} digits: Python reads at most 4300", column=digits.start() + 1,
                       fix="write it as a string (in quotes)")
    return Problem(f"not valid JSON: {exc}", fix="each line must be one complete JSON object")


def _row_fix(row: object, name: str) -> str | None:
    if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
        return ("a preference pair is the prompt ('conversations', 'messages' or 'prompt') and two answers, "
                "'chosen' and 'rejected' (strings or assistant turns)")
    return None


def _deepest_column(line: str) -> int:
    depth = deepest = column = 0
    for i, char in enumerate(line, start=1):  # brackets inside strings count too: a rough position
        depth += (char in "[{") - (char in "]}")
        if depth > deepest:
            deepest, column = depth, i
    return column


def _lone_surrogate(line: str, row: object) -> Problem | None:
    """An escaped half of a UTF-16 pair (``"\\ud830"``) parses, but is no character and cannot be saved."""
    if "\\u" not in line:
        return None
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        found = re.search(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})", line)
        return Problem(f"{found.group() if found else 'an escape'} is half of a UTF-16 surrogate pair without its "
                       "other half: not a character", column=found.start() + 1 if found else None,
                       fix="remove it, or write the complete pair (e.g. \\ud83d\\ude00); the text was "
                           "probably cut in the middle of an emoji")
    return None


def read_examples(path: Path, name: str | None = None,
                  data: bytes | None = None) -> tuple[DatasetInfo, list[Example]]:
    """Validate a whole JSONL dataset; raise InvalidInput listing the first bad lines.

    ``data``: the file's bytes when the caller already read them (ingest reads inbox files capped).
    """
    name = name or Path(path).name
    data = Path(path).read_bytes() if data is None else data
    if b"\x00" in data[:8192]:
        raise InvalidInput(name, [Problem("the file contains NUL bytes: it is binary, not JSONL text",
                                          fix="export the dataset as UTF-8 JSON Lines (one object per line)")],
                           "binary file")
    problems: list[Problem] = []
    examples: list[Example] = []
    lines: list[int] = []
    fmt: str | None = None
    fmt_line = 0
    bad = 0
    repeats: dict[str, list[int]] = {}
    for number, line in iter_lines(name, data):
        try:
            row = json.loads(line)
            problem = _lone_surrogate(line, row)
        except (ValueError, RecursionError) as exc:
            row, problem = None, _json_problem(line, exc)
        if problem is not None:
            bad += 1
            if len(problems) < MAX_REPORTED:
                problem.line = number
                problems.append(problem)
            continue
        try:
            if not isinstance(row, dict):
                raise RowError(f"a line must be a JSON object, not {type(row).__name__}")
            row_fmt = detect_format(row)
            if row_fmt is None:
                raise RowError(f"keys {sorted(row)[:8]} match no known format; {FORMAT_HELP}")
            if fmt is None:
                fmt, fmt_line = row_fmt, number
            elif row_fmt != fmt:
                raise RowError(f"this row is '{row_fmt}' but line {fmt_line} is '{fmt}': mixed formats in one "
                               "file; split them into one file per format")
            examples.append(normalize_row(row, fmt))
            lines.append(number)
        except (RowError, RecursionError) as exc:
            bad += 1
            message = str(exc) if isinstance(exc, RowError) else TOO_DEEP
            if message in repeats:  # said once, with the count and the lines
                repeats[message].append(number)
            elif len(problems) < MAX_REPORTED:
                repeats[message] = []
                problems.append(Problem(message, line=number, fix=_row_fix(row, name)))
    for problem in problems:
        more_lines = repeats.get(problem.message)
        if more_lines:
            shown = ", ".join(map(str, more_lines[:10])) + (", ..." if len(more_lines) > 10 else "")
            problem.message += f" (the same on {len(more_lines)} more line(s): {shown})"
    if problems:
        shown_lines = len(problems) + sum(len(lines) for lines in repeats.values())
        more = f" (first {len(problems)} shown)" if bad > shown_lines else ""
        raise InvalidInput(name, problems, f"{bad} bad line(s){more}; nothing was imported")
    if not examples:
        raise InvalidInput(name, [Problem("the file has no data lines", fix=FORMAT_HELP)], "empty dataset")
    notes: list[str] = []
    if fmt == "kto":
        examples, note = pair_kto_rows(name, examples, lines)
        notes.append(note)
    labels: dict[str, int] = {}
    for ex in examples:
        if ex.label is not None:
            labels[ex.label] = labels.get(ex.label, 0) + 1
    info = DatasetInfo(format=fmt or "", rows=len(examples), labels=labels,
                       sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), notes=notes)
    return info, examples


def pair_kto_rows(name: str, rows: list[Example], lines: list[int]) -> tuple[list[Example], str]:
    """KTO rows to what trainbox trains: a desirable answer is a target; an undesirable one becomes the rejected
    side of a preference pair with the first desirable answer to the same prompt, or is dropped (never a target).

    Returns the rows and a sentence saying what happened (with the lines of dropped rows)."""
    good: dict[str, Example] = {}
    for ex in rows:
        if ex.label == "desirable":
            good.setdefault(json.dumps(ex.messages[:-1], sort_keys=True), ex)
    out: list[Example] = []
    paired, dropped = 0, []
    for ex, line in zip(rows, lines):
        desirable, ex.label = ex.label == "desirable", None
        if desirable:
            out.append(ex)
            continue
        match = good.get(json.dumps(ex.messages[:-1], sort_keys=True))
        if match is None:
            dropped.append(line)
            continue
        pair = Example(id="", format="kto", messages=ex.messages[:-1], meta=ex.meta, kind="preference",
                       source_id=ex.id, chosen=match.messages[-1]["content"], rejected=ex.messages[-1]["content"])
        pair.id = hashlib.sha256(json.dumps(["kto-pair", pair.messages, pair.chosen, pair.rejected],
                                            sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
        out.append(pair)
        paired += 1
    desirable = len(rows) - paired - len(dropped)
    note = (f"{name}: KTO rows: {desirable} desirable answer(s) trained as targets, {paired} undesirable answer(s) "
            "paired with a desirable answer to the same prompt as preference pairs (the rejected side)")
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
        note += (f", {len(dropped)} undesirable answer(s) dropped on line(s) {shown}: no desirable answer to the "
                 "same prompt to pair them with, and an undesirable answer is never trained as a target (add a "
                 "desirable answer to those prompts to use them)")
    if not out:
        raise InvalidInput(name, [Problem("every row is an undesirable KTO answer (label false) and none has a "
                                          "desirable answer to the same prompt: nothing to train",
                                          line=dropped[0] if dropped else None,
                                          fix="add rows with label true for the same prompts")], "nothing to train")
    return out, note
