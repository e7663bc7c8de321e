"""Render the job schema as the reference tables of docs/jobs.md, so the docs cannot drift from the code.

    python -m daemon.schemadoc            # print
    python -m daemon.schemadoc --write    # replace the marked section of docs/jobs.md
"""
from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from trainbox.jobspec import JobSpec
from trainbox.yamlmodel import _find_model

BEGIN, END = "<!-- jobspec:begin -->", "<!-- jobspec:end -->"
JOBS_DOC = Path(__file__).resolve().parent.parent / "docs" / "jobs.md"


def _type_name(annotation: object) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def render() -> str:
    out: list[str] = []
    sections: list[tuple[str, type[BaseModel]]] = [("", JobSpec)]
    while sections:
        prefix, model = sections.pop(0)
        out.append(f"#### `{prefix.rstrip('.') or 'top level'}`\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            sub = _find_model(field.annotation)
            if sub is not None:
                is_map = typing.get_origin(field.annotation) is dict
                sections.append((f"{prefix}{name}." + ("<key>." if is_map else ""), sub))
                kind = "map of dotted key path to section" if is_map else "section"
            else:
                kind = _type_name(field.annotation)
            out.append(f"| `{prefix}{name}` | {kind} | {_default(field)} | {field.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def readme_section(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/jobs.md in place")
    args = parser.parse_args()
    doc = render()
    if not args.write:
        print(doc, end="")
        return
    text = JOBS_DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    JOBS_DOC.write_text(text[:start] + "\n" + doc + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
