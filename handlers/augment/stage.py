"""The augment stage, top to bottom: check the data, size the target, generate per source row into a journal,
then score, filter, deduplicate, select and write ``augmented/train.jsonl`` with stats and a summary."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from handlers.augment import report
from handlers.augment.embeddings import Encoder
from handlers.augment.journal import Journal
from handlers.augment.rewriter import make_rewriter
from handlers.augment.selection import score_rows, select
from handlers.augment.source import Source, as_source
from handlers.augment.techniques import TECHNIQUES, Neighbour, Tools
from handlers.context import StageContext
from trainbox.errors import StageFailed, StopRequested
from trainbox.fsio import write_text_atomically
from trainbox.jobspec import AugmentSpec
from trainbox.protocol import StageResult
from trainbox.rows import Example

log = logging.getLogger(__name__)
OUT = "augmented"
NEIGHBOURS = 5


def auto_multiplier(rows: int) -> tuple[float, str]:
    """5.0 below 100 rows, 2.0 above 200, 1.5 above 500; linear in between (and the rule, in words)."""
    if rows < 100:
        return 5.0, f"{rows} rows < 100: 5.0"
    if rows <= 200:
        value = 5.0 - 3.0 * (rows - 100) / 100
        return round(value, 3), f"{rows} rows between 100 and 200: interpolated between 5.0 and 2.0 -> {value:.2f}"
    if rows <= 500:
        value = 2.0 - 0.5 * (rows - 200) / 300
        return round(value, 3), f"{rows} rows between 200 and 500: interpolated between 2.0 and 1.5 -> {value:.2f}"
    return 1.5, f"{rows} rows > 500: 1.5"


def target_multiplier(spec: AugmentSpec, rows: int) -> tuple[float, str]:
    if spec.multiplier == "auto":
        return auto_multiplier(rows)
    return float(spec.multiplier), f"augment.multiplier {float(spec.multiplier):g}"


def train_split(ctx: StageContext) -> Path:
    try:
        return ctx.input_artifact("prepare", "train")
    except KeyError:
        raise StageFailed("the augment stage reads the prepare stage's train split; add prepare to the job's "
                          "stages") from None


def read_sources(path: Path, spec: AugmentSpec) -> tuple[list[Example], list[Source]]:
    """The train rows and their (prompt, reply) views; fails before any work when there are too few."""
    with open(path, encoding="utf-8") as fh:
        examples = [Example.from_json(line) for line in fh if line.strip()]
    if len(examples) < spec.min_rows:
        raise StageFailed(f"Insufficient samples: {len(examples)} < {spec.min_rows} rows in the train split; "
                          "add rows to the dataset or lower augment.min_rows")
    sources = [s for s in (as_source(i, ex) for i, ex in enumerate(examples)) if s is not None]
    if not sources:
        formats = sorted({ex.format for ex in examples})
        raise StageFailed(f"augment rewrites conversation replies, and the train split has none ({', '.join(formats)} "
                          "rows); use chat data (messages, conversations or instruction/output) or remove augment "
                          "from the job's stages")
    return examples, sources


def fingerprint(spec: AugmentSpec, seed: int, per_technique: int, train_file: Path) -> str:
    """What the journal's rows depend on: the generation settings, the seed and the train split."""
    settings = spec.model_dump(mode="json", include={"techniques", "styles", "scenarios", "relationships",
                                                     "backend", "llm", "encoder"})
    settings["llm"] = {k: settings["llm"][k] for k in ("url", "model", "temperature", "max_tokens")}
    digest = hashlib.sha256(json.dumps([settings, seed, per_technique], sort_keys=True).encode())
    digest.update(train_file.read_bytes())
    return digest.hexdigest()[:16]


def neighbour_finder(sources: list[Source], prompts: np.ndarray,
                     replies: np.ndarray) -> Callable[[Source], list[Neighbour]]:
    """For a source, the other rows by prompt similarity (most similar first), with their reply similarity."""
    position = {s.id: k for k, s in enumerate(sources)}

    def neighbours(source: Source) -> list[Neighbour]:
        i = position[source.id]
        sims = prompts @ prompts[i]
        order = [j for j in np.argsort(-sims, kind="stable") if j != i][:NEIGHBOURS]
        return [Neighbour(sources[j], float(sims[j]), float(replies[j] @ replies[i])) for j in order]
    return neighbours


def generate(ctx: StageContext, sources: list[Source], tools: Tools, journal: Journal, width: int) -> None:
    """Every technique on each source row the journal does not have yet, ``width`` rows at a time (so an llm
    endpoint gets ``concurrency`` requests in flight); rows are journaled in source order."""
    def rows_of(source: Source) -> list[Example]:
        return [row for name in tools.spec.techniques for row in TECHNIQUES[name](source, tools)]

    todo = sources[journal.done:]
    with ThreadPoolExecutor(max_workers=width) as pool:
        for start in range(0, len(todo), width):
            if ctx.should_stop():
                raise StopRequested(f"augmented {journal.done} of {len(sources)} source rows; resumes from there")
            chunk = todo[start:start + width]
            for source, rows in zip(chunk, pool.map(rows_of, chunk)):
                journal.append(source.index, source.id, rows)
            ctx.report_progress(step=journal.done, total_steps=len(sources), rows_generated=len(journal.rows))


def run_augment(ctx: StageContext) -> StageResult:
    spec, started = ctx.job.augment, time.time()
    train_file = train_split(ctx)
    examples, sources = read_sources(train_file, spec)
    multiplier, rule = target_multiplier(spec, len(examples))
    wanted = max(0, round(multiplier * len(examples)) - len(examples))
    log.info("augmenting %d train rows to %gx (%s): %d new rows wanted from %s (%s backend)", len(examples),
             multiplier, rule, wanted, ", ".join(spec.techniques), spec.backend)
    out = ctx.stage_dir / OUT
    out.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(spec.encoder)
    replies = encoder.encode([s.reply for s in sources])
    prompts = encoder.encode([s.user_text or s.reply for s in sources])
    rewriter = make_rewriter(spec, ctx.job.seed, ctx.home / "cache" / "augment-llm")
    # variants per technique and row: twice what the target needs on average, so filtering leaves enough
    per_technique = max(1, math.ceil(2 * wanted / (len(sources) * len(spec.techniques))))
    tools = Tools(spec, rewriter, neighbour_finder(sources, prompts, replies), per_technique)
    journal = Journal(out / "journal.jsonl", fingerprint(spec, ctx.job.seed, per_technique, train_file))
    generate(ctx, sources, tools, journal, spec.llm.concurrency if spec.backend == "llm" else 1)
    by_id = {s.id: s for s in sources}
    source_replies = {s.id: replies[k] for k, s in enumerate(sources)}
    embeddings = {**source_replies, **score_rows(journal.rows, by_id, source_replies, encoder)}
    chosen = select(examples, journal.rows, embeddings, wanted, spec.min_quality,
                    spec.near_duplicate_cosine if spec.dedup else None, list(spec.techniques))
    originals = [_with_provenance(ex) for ex in examples]
    write_text_atomically(out / "train.jsonl", "".join(r.to_json() + "\n" for r in originals + chosen.rows))
    stats = report.stats(spec, len(examples), chosen, multiplier, rule, rewriter, encoder.path,
                         time.time() - started)
    for line in report.log_lines(stats):
        log.info("%s", line)
    report.write(ctx.stage_dir, stats, chosen.rows, by_id)
    return StageResult(summary=report.summary(stats),
                       artifacts={"train": f"{OUT}/train.jsonl", "stats": report.STATS, "summary": report.HTML,
                                  "journal": f"{OUT}/journal.jsonl"},
                       message=report.headline(stats))


def _with_provenance(example: Example) -> Example:
    meta = dict(example.meta)
    meta["provenance"] = {"technique": "original"}
    return Example(**{**example.__dict__, "meta": meta})
