"""Leftover template placeholders (``{{name}}``, ``{{ author }}``): rows that would be trained literally.

Datasets such as LLaMA-Factory's ``identity.json`` ship with placeholders meant to be filled in before
training; the prepare stage counts the rows that still have them and says so once per dataset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")


@dataclass(frozen=True)
class PlaceholderReport:
    dataset: str
    rows: int  # lines with at least one placeholder
    names: tuple[str, ...]  # distinct placeholders, in order of first appearance
    first_line: int
    first_text: str

    def warning(self) -> str:
        shown = ", ".join(self.names[:5]) + (" ..." if len(self.names) > 5 else "")
        return (f"{self.dataset}: {self.rows} row(s) contain template placeholders ({shown}) that would be "
                f"trained literally; first at line {self.first_line}: {self.first_text}; replace them with "
                "real values (e.g. sed -i 's/{{name}}/MyBot/g') and drop the file again")


def find_placeholders(path: Path, dataset: str) -> PlaceholderReport | None:
    """Scan a JSONL dataset line by line; None when no line has a placeholder."""
    rows, names, first = 0, {}, None
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            found = PLACEHOLDER.findall(line)
            if not found:
                continue
            rows += 1
            names.update(dict.fromkeys(re.sub(r"\s+", "", f) for f in found))
            if first is None:
                first = (number, line.strip()[:160])
    if first is None:
        return None
    return PlaceholderReport(dataset, rows, tuple(names), first[0], first[1])
