"""Load a job YAML into a ``JobSpec``; every error names the file, line, column, key path and fix."""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from daemon.errors import InvalidInput, Problem
from daemon.jobspec import JobSpec

MAX_JOB_BYTES = 1_000_000


class YAML12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so keys like ``on:`` and values like ``NO``
    (a label, a country code) stay strings instead of silently becoming True/False."""


YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def decode_utf8(name: str, data: bytes) -> str:
    """Decode UTF-8 (BOM allowed) or raise InvalidInput naming the first bad line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            name,
            [Problem(f"byte 0x{data[exc.start]:02x} is not valid UTF-8", line=line,
                     fix="save the file as UTF-8 (most editors: 'Save with encoding' -> UTF-8)")],
            "not a UTF-8 text file",
        ) from None


def load_job_file(path: Path, name: str | None = None) -> JobSpec:
    """Parse and validate a job YAML file."""
    name = name or Path(path).name
    data = Path(path).read_bytes()
    if len(data) > MAX_JOB_BYTES:
        raise InvalidInput(name, [Problem(f"{len(data)} bytes is too large for a job file",
                                          fix="a job file is a few lines of YAML; put data in a .jsonl dataset")],
                           "too large")
    return parse_job_text(decode_utf8(name, data), name)


def parse_job_text(text: str, name: str) -> JobSpec:
    return parse_yaml_model(text, name, JobSpec, examples="configs/jobs/*.yaml")


M = typing.TypeVar("M", bound=BaseModel)


def parse_yaml_model(text: str, name: str, schema: type[M], examples: str) -> M:
    """Parse YAML ``text`` into the pydantic ``schema``; InvalidInput carries line, column, key and fix.

    ``examples`` names the commented example files that fixes point to.
    """
    if not text.strip():
        raise InvalidInput(name, [Problem("the file is empty",
                                          fix=f"see {examples} for complete examples")], "empty file")
    try:
        root = yaml.compose(text, Loader=YAML12Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InvalidInput(name, [Problem(
            f"YAML syntax error: {getattr(exc, 'problem', None) or exc}",
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
            fix="check indentation (spaces, not tabs) and quoting around this position")],
            "not valid YAML") from None
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else None
        raise InvalidInput(name, [Problem("the top level must be a mapping of keys (key: value lines)",
                                          line=line, fix=f"see {examples} for the layout")],
                           "not a mapping")
    problems = _duplicate_keys(root)
    if problems:
        raise InvalidInput(name, problems, "duplicate keys")
    raw = yaml.load(text, Loader=YAML12Loader)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(name, [_problem_from_error(err, root, schema, examples) for err in exc.errors()],
                           f"{exc.error_count()} problem(s) in the job") from None


def _duplicate_keys(node: yaml.Node, path: str = "") -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = str(key.value)
            kp = f"{path}.{k}" if path else k
            if k in seen:
                problems.append(Problem("key appears twice", line=key.start_mark.line + 1,
                                        column=key.start_mark.column + 1, key=kp,
                                        fix="keep one of the two entries"))
            seen.add(k)
            problems += _duplicate_keys(value, kp)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{path}[{i}]")
    return problems


def _node_at(root: yaml.Node, loc: tuple) -> tuple[yaml.Node, bool]:
    """The deepest node along ``loc``; the flag tells whether the whole path was found."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if str(k.value) == str(part)]
            if not match:
                return node, False
            key, value = match[0]
            node = value if not isinstance(part, str) or loc[-1] != part else value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node, False
    return node, True


def _key_node(root: yaml.Node, loc: tuple) -> yaml.Node | None:
    parent, found = _node_at(root, loc[:-1])
    if found and isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if str(k.value) == str(loc[-1]):
                return k
    return None


def _model_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the keys at ``loc`` (for did-you-mean hints)."""
    model: type[BaseModel] | None = schema
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _find_model(field.annotation)
    return model


def _find_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _problem_from_error(err: dict, root: yaml.Node, schema: type[BaseModel], examples: str) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and p.endswith("]")))
    key = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        node = _key_node(root, loc)
        owner = _model_at(schema, loc[:-1])
        choices = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        fix = f"did you mean {_dotted(loc[:-1] + (close[0],))}?" if close else (
            f"allowed keys here: {', '.join(choices)}" if choices else "remove it")
        return Problem("is not a field", line=_line(node), column=_col(node), key=key, fix=fix)
    if kind == "missing":
        parent, _ = _node_at(root, loc[:-1])
        return Problem("is required but missing", line=_line(parent), key=key,
                       fix=f"add '{loc[-1]}:' (see {examples})")
    node, found = _node_at(root, loc)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) and found else None
    return Problem(f"{msg}" + (f" (got {shown})" if shown else ""), line=_line(node), column=_col(node),
                   key=key or "(top level)", fix=_fix_for(kind, err))


def _fix_for(kind: str, err: dict) -> str | None:
    ctx = err.get("ctx") or {}
    if kind == "literal_error":
        return f"use one of: {ctx.get('expected', '')}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "choose a value inside the allowed range"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "change the value's type (quote strings, write numbers without quotes)"
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _col(node: yaml.Node | None) -> int | None:
    return node.start_mark.column + 1 if node is not None else None


def key_position(text: str, dotted: str) -> tuple[int | None, int | None]:
    """(line, column) of the key ``a.b.c`` in a YAML text, or of its nearest present parent."""
    try:
        root = yaml.compose(text, Loader=YAML12Loader)
    except yaml.YAMLError:
        return None, None
    node = _key_node(root, tuple(dotted.split("."))) if root is not None else None
    parts = dotted.split(".")
    while node is None and len(parts) > 1:
        parts = parts[:-1]
        node = _key_node(root, tuple(parts))
    return _line(node), _col(node)
