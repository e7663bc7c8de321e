"""Load untrusted YAML text into any pydantic model; every error names the file, line, column, key path and fix."""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from trainbox.errors import InvalidInput, Problem

# bounds on what a YAML text may build, so a small hostile file (alias "billion laughs", deep nesting)
# costs milliseconds: values are counted with aliases expanded
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 20_000
PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                       ("null", "bool", "int", "float", "str", "seq", "map", "merge"))


class YAML12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so keys like ``on:`` and values like ``NO``
    (a label, a country code) stay strings instead of silently becoming True/False."""


YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 has no implicit timestamps either: 2024-01-01 stays text, and no date is ever out of range
YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in YAML12Loader.yaml_implicit_resolvers.items()
}


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


class _BoundedLoader(YAML12Loader):
    """Composes at most ``MAX_YAML_VALUES`` nodes, nested at most ``MAX_YAML_DEPTH`` deep."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._count = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self._depth += 1
        self._count += 1
        if self._depth > MAX_YAML_DEPTH or self._count > MAX_YAML_VALUES:
            raise _TooBig(self.peek_event().start_mark, deep=self._depth > MAX_YAML_DEPTH)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooBig(Exception):
    def __init__(self, mark: yaml.Mark | None, deep: bool):
        super().__init__(mark)
        self.mark = mark
        self.deep = deep

    def problem(self) -> Problem:
        what = (f"values are nested more than {MAX_YAML_DEPTH} levels deep" if self.deep else
                f"the file holds more than {MAX_YAML_VALUES} values (anchors/aliases counted expanded)")
        return Problem(what, line=self.mark.line + 1 if self.mark else None,
                       column=self.mark.column + 1 if self.mark else None,
                       fix="write the values out plainly; a trainbox file needs a few levels and no alias chains")


def _check_flow_depth(text: str) -> None:
    """Refuse deep ``[[[[``/``{{{{`` before PyYAML sees it: its scanner is quadratic in flow depth.

    Brackets inside quotes count too (a cheap over-estimate: only text with 64 unclosed brackets trips it).
    """
    depth = 0
    for match in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_YAML_DEPTH:
            line = text.count("\n", 0, match.start())
            raise _TooBig(yaml.Mark("", match.start(), line, match.start() - (text.rfind("\n", 0, match.start()) + 1),
                                    None, None), deep=True)


M = typing.TypeVar("M", bound=BaseModel)


def parse_yaml_model(text: str, name: str, schema: type[M], examples: str) -> M:
    """Parse YAML ``text`` into the pydantic ``schema``; InvalidInput carries line, column, key and fix.

    ``examples`` names the commented example files that fixes point to.
    """
    if not text.strip():
        raise InvalidInput(name, [Problem("the file is empty",
                                          fix=f"see {examples} for complete examples")], "empty file")
    loader = None
    try:
        _check_flow_depth(text)
        loader = _BoundedLoader(text)  # its reader already refuses control characters
        root = loader.get_single_node()
        if not isinstance(root, yaml.MappingNode):
            line = root.start_mark.line + 1 if root is not None else None
            raise InvalidInput(name, [Problem("the top level must be a mapping of keys (key: value lines)",
                                              line=line, fix=f"see {examples} for the layout")],
                               "not a mapping")
        problems = _walk_checked(root)
        if problems:
            raise InvalidInput(name, problems, "not a plain YAML file" if problems[0].key is None
                               else "duplicate keys")
        raw = _construct(loader, root, name)
    except _TooBig as exc:
        raise InvalidInput(name, [exc.problem()], "YAML too large or too deep") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise InvalidInput(name, [Problem(
            f"character {exc.character!r} is not allowed in YAML", line=line, column=column,
            fix="remove control characters (such as NUL) and save the file as plain UTF-8 text")],
            "not valid YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InvalidInput(name, [Problem(
            f"YAML {'value' if isinstance(exc, yaml.constructor.ConstructorError) else 'syntax'} error: "
            f"{getattr(exc, 'problem', None) or exc}",
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
            fix="check indentation (spaces, not tabs) and quoting around this position")],
            "not valid YAML") from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(name, [_problem_from_error(err, root, schema, examples) for err in exc.errors()],
                           f"{exc.error_count()} problem(s) in the job") from None


def _construct(loader: yaml.Loader, root: yaml.Node, name: str) -> object:
    """Python values of the checked tree; a scalar Python cannot hold (an integer of more than 4300
    digits) is reported at its own line."""
    try:
        return loader.construct_document(root)
    except ValueError:
        probe = YAML12Loader("")  # the failed construction left ``loader`` mid-way
        stack = [root]
        while stack:
            node = stack.pop()
            if isinstance(node, yaml.ScalarNode):
                try:
                    probe.construct_object(node)
                except ValueError as exc:
                    raise InvalidInput(name, [Problem(
                        f"this value cannot be read: {exc}", line=_line(node), column=_col(node),
                        fix="quote it to make it text, or write a smaller number")], "not valid YAML") from None
            elif isinstance(node, yaml.MappingNode):
                stack += [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                stack += node.value
        raise


def _walk_checked(root: yaml.Node) -> list[Problem]:
    """Tags and duplicate keys; raises _TooBig once the tree, aliases expanded, passes the bounds.

    Iterative with a budget: an alias chain (or a cycle, ``&a [*a]``) is cut off, never walked whole.
    """
    tags: list[Problem] = []
    dups: list[Problem] = []
    budget = MAX_YAML_VALUES
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_YAML_DEPTH:
            raise _TooBig(node.start_mark, deep=depth > MAX_YAML_DEPTH)
        if node.tag not in PLAIN_TAGS and len(tags) < 5:
            tags.append(Problem(f"the tag {node.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed",
                                line=node.start_mark.line + 1, column=node.start_mark.column + 1,
                                fix="remove the tag: trainbox files hold plain values (text, numbers, "
                                    "true/false, lists, mappings)"))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                k = str(key.value) if isinstance(key, yaml.ScalarNode) else "(complex key)"
                kp = f"{path}.{k}" if path else k
                if k in seen and len(dups) < 20:
                    dups.append(Problem("key appears twice", line=key.start_mark.line + 1,
                                        column=key.start_mark.column + 1, key=kp,
                                        fix="keep one of the two entries"))
                seen.add(k)
                stack += [(value, kp, depth + 1), (key, kp, depth + 1)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value)]
    return tags or dups


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
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        model = _find_model(field.annotation) or _keys_of(extra.get("keys_of"))
    return model


def _keys_of(name: object) -> type[BaseModel] | None:
    """The model a free-form dict field declares its keys from (``json_schema_extra={"keys_of": "JobSpec"}``)."""
    if name != "JobSpec":
        return None
    from trainbox.jobspec import JobSpec  # imported here: the job schema is one user of this generic loader

    return JobSpec


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
        loader = _BoundedLoader(text)
    except yaml.YAMLError:
        return None, None
    try:
        root = loader.get_single_node()
    except (yaml.YAMLError, _TooBig):
        return None, None
    finally:
        loader.dispose()
    node = _key_node(root, tuple(dotted.split("."))) if root is not None else None
    parts = dotted.split(".")
    while node is None and len(parts) > 1:
        parts = parts[:-1]
        node = _key_node(root, tuple(parts))
    return _line(node), _col(node)
