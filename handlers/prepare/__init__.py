"""prepare: read the job's datasets, split rows by content hash, shuffle by seed, write splits and stats.

The split of a row depends only on its content, so appending rows to a dataset never moves an
existing row to another split (no test-set leakage between versions of a dataset).
"""
from __future__ import annotations

import logging
import random
from collections import Counter

import numpy as np

from handlers.context import StageContext
from handlers.prepare.placeholders import find_placeholders
from trainbox.errors import StageFailed
from trainbox.fsio import write_json_atomically, write_text_atomically
from trainbox.protocol import StageResult
from trainbox.rows import Example, read_examples

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def split_of(example_id: str, fractions: dict[str, float]) -> str:
    """The split a row belongs to, from its content hash alone."""
    point = int(example_id[:12], 16) / float(16**12)
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if point < edge:
            return name
    return SPLITS[-1]


def run(ctx: StageContext) -> StageResult:
    spec = ctx.job.prepare
    rows: list[Example] = []
    formats: Counter[str] = Counter()
    warnings: list[str] = []
    for ref in ctx.datasets:
        info, examples = read_examples(ref.path, ref.name)
        formats[info.format] += info.rows
        rows += examples
        log.info("read %s: %d %s rows", ref.name, info.rows, info.format)
        for note in info.notes:
            log.info("%s", note)
            if "dropped" in note:  # rows of the file that are not trained: the job's message says so too
                warnings.append(note)
        report = find_placeholders(ref.path, ref.name)
        if report is not None:
            warnings.append(report.warning())
            log.warning("%s", warnings[-1])
            ctx.emit_event("data_warning", warnings[-1], dataset=ref.name)
    unique = list({ex.id: ex for ex in rows}.values())
    duplicates = len(rows) - len(unique)
    if duplicates:
        log.info("dropped %d exact duplicate row(s)", duplicates)
    rng = random.Random(ctx.job.seed)
    unique.sort(key=lambda ex: ex.id)  # input order must not matter, only the seed
    if spec.shuffle:
        rng.shuffle(unique)
    if spec.max_rows:
        unique = unique[: spec.max_rows]
    fractions = spec.split.model_dump()
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ex in unique:
        splits[split_of(ex.id, fractions)].append(ex)
    _fill_empty_splits(splits, fractions)
    if not splits["train"]:
        raise StageFailed(f"no training rows: {len(unique)} row(s) in total; add data or raise prepare.split.train")

    out = ctx.stage_dir / "splits"
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        write_text_atomically(out / f"{name}.jsonl", "".join(ex.to_json() + "\n" for ex in examples))
    stats = _stats(splits, formats, duplicates)
    write_json_atomically(ctx.stage_dir / "stats.json", stats)
    summary = {"format": stats["format"], "rows": stats["rows"], "labels": stats["labels"],
               "duplicates_dropped": duplicates, "data_warnings": warnings}
    return StageResult(summary=summary,
                       artifacts={**{n: f"splits/{n}.jsonl" for n in SPLITS}, "stats": "stats.json"},
                       message="; ".join([", ".join(f"{n} {len(splits[n])}" for n in SPLITS), *warnings]))


def _fill_empty_splits(splits: dict[str, list[Example]], fractions: dict[str, float]) -> None:
    """Tiny datasets: give a split that should have rows at least one, taken from train's last rows."""
    for name in ("val", "test"):
        if fractions[name] > 0 and not splits[name] and len(splits["train"]) > 2:
            splits[name].append(splits["train"].pop())


def _length(ex: Example) -> int:
    parts = [m["content"] for m in ex.messages or []] + [ex.prompt or "", ex.completion or "", ex.text or ""]
    return sum(len(p) for p in parts)


def _stats(splits: dict[str, list[Example]], formats: Counter[str], duplicates: int) -> dict:
    lengths = np.array([_length(ex) for exs in splits.values() for ex in exs])
    labels = Counter(ex.label for exs in splits.values() for ex in exs if ex.label is not None)
    return {
        "format": formats.most_common(1)[0][0] if formats else None,
        "formats": dict(formats),
        "rows": {name: len(exs) for name, exs in splits.items()},
        "labels": dict(sorted(labels.items())),
        "labels_per_split": {name: dict(Counter(ex.label for ex in exs if ex.label is not None))
                             for name, exs in splits.items()},
        "duplicates_dropped": duplicates,
        "text_length_chars": {f"p{p}": float(np.percentile(lengths, p)) for p in (5, 25, 50, 75, 95, 100)}
        if len(lengths) else {},
    }
