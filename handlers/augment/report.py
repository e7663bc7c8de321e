"""What the augment stage tells: ``stats.json``, a short HTML summary, log lines and the stage summary."""
from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from handlers.augment.rewriter import Rewriter
from handlers.augment.selection import Selection, generated_text
from handlers.augment.source import Source
from trainbox.fsio import write_json_atomically, write_text_atomically
from trainbox.jobspec import AugmentSpec
from trainbox.rows import Example

STATS = "stats.json"
HTML = "augment_summary.html"
EXAMPLES_PER_KIND = 2


def stats(spec: AugmentSpec, original: int, chosen: Selection, multiplier: float, rule: str, rewriter: Rewriter,
          encoder: str, seconds: float) -> dict[str, Any]:
    per_kind: dict[str, list[float]] = defaultdict(list)
    for row in chosen.rows:
        per_kind[row.kind].append(row.meta["provenance"]["quality"])
    total = original + len(chosen.rows)
    out = {
        "rows_original": original, "rows_generated": len(chosen.rows), "rows_total": total,
        "ratio": round(total / original, 2), "multiplier": multiplier, "multiplier_rule": rule,
        "per_kind": {k: {"rows": len(per_kind[k]), "mean_quality": round(sum(per_kind[k]) / len(per_kind[k]), 3)}
                     for k in spec.techniques if per_kind[k]},
        "quality_levels": {level: chosen.levels.get(level, 0) for level in ("high", "medium", "low")},
        "candidates": chosen.candidates, "dropped_low_quality": chosen.low_quality,
        "min_quality": spec.min_quality, "duplicates_exact": chosen.duplicates_exact,
        "duplicates_near": chosen.duplicates_near, "not_needed": chosen.not_needed,
        "backend": rewriter.name, "model": rewriter.model, "encoder": encoder, "seconds": round(seconds, 2),
    }
    if hasattr(rewriter, "hits"):
        out["llm_cache"] = {"hits": rewriter.hits, "misses": rewriter.misses}
    return out


def headline(s: dict[str, Any]) -> str:
    """The achieved ratio and what was dropped, in one line (``trainbox show`` prints it)."""
    kinds = ", ".join(f"{k} {v['rows']}" for k, v in s["per_kind"].items())
    return (f"{s['rows_original']} -> {s['rows_total']}, {s['ratio']:.2f}x ({kinds or 'no new rows'}); "
            f"{s['dropped_low_quality']} below quality {s['min_quality']:g}, "
            f"{s['duplicates_exact'] + s['duplicates_near']} duplicates dropped")


def log_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"augmented {headline(s)}", f"target multiplier: {s['multiplier_rule']}"]
    lines += [f"{kind}: {v['rows']} rows, mean quality {v['mean_quality']:.2f}" for kind, v in s["per_kind"].items()]
    levels = s["quality_levels"]
    lines.append(f"quality levels: {levels['high']} high, {levels['medium']} medium, {levels['low']} low; "
                 f"{s['candidates']} candidates, {s['duplicates_exact']} exact and {s['duplicates_near']} near "
                 f"duplicates, {s['not_needed']} not needed for the target")
    if "llm_cache" in s:
        lines.append(f"llm cache: {s['llm_cache']['hits']} hits, {s['llm_cache']['misses']} requests")
    return lines


def summary(s: dict[str, Any]) -> dict[str, Any]:
    """The numbers the store keeps (the registry reads ``rows_total``)."""
    keys = ("rows_original", "rows_generated", "rows_total", "ratio", "multiplier", "dropped_low_quality",
            "duplicates_exact", "duplicates_near", "quality_levels")
    return {**{k: s[k] for k in keys}, "rows_per_kind": {k: v["rows"] for k, v in s["per_kind"].items()}}


def _example_html(row: Example, source: Source) -> str:
    provenance = row.meta["provenance"]
    label = "rejected" if row.rejected is not None else "generated"
    return (f"<tr><td>{html.escape(str(provenance.get('target')))}</td><td>{html.escape(source.reply)}</td>"
            f"<td>{label}: {html.escape(generated_text(row))}</td><td>{provenance['quality']:.2f}</td></tr>")


def write(stage_dir: Path, s: dict[str, Any], rows: list[Example], sources: dict[str, Source]) -> None:
    write_json_atomically(stage_dir / STATS, s)
    kinds = "".join(f"<tr><td>{k}</td><td>{v['rows']}</td><td>{v['mean_quality']:.2f}</td></tr>"
                    for k, v in s["per_kind"].items())
    examples = []
    for kind in s["per_kind"]:
        shown = [r for r in rows if r.kind == kind][:EXAMPLES_PER_KIND]
        examples.append(f"<h3>{kind}</h3><table><tr><th>target</th><th>source reply</th><th>row</th>"
                        "<th>quality</th></tr>" + "".join(_example_html(r, sources[r.source_id or ""]) for r in shown)
                        + "</table>")
    levels = s["quality_levels"]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>augment summary</title><style>"
        "body{font-family:sans-serif;max-width:60em}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "table{border-collapse:collapse}</style></head><body>"
        f"<h1>Augmentation: {s['rows_original']} &rarr; {s['rows_total']} rows, {s['ratio']:.2f}x</h1>"
        f"<p>Target: {html.escape(s['multiplier_rule'])}. Backend {s['backend']}, encoder "
        f"{html.escape(str(s['encoder']))}, {s['seconds']:.1f} s.</p>"
        f"<p>{s['candidates']} candidates; {s['dropped_low_quality']} below quality {s['min_quality']:g}; "
        f"{s['duplicates_exact']} exact and {s['duplicates_near']} near duplicates; {s['not_needed']} not needed. "
        f"Quality levels of the kept rows: {levels['high']} high, {levels['medium']} medium, {levels['low']} low.</p>"
        f"<table><tr><th>kind</th><th>rows</th><th>mean quality</th></tr>{kinds}</table>"
        f"<h2>Examples</h2>{''.join(examples)}</body></html>\n")
    write_text_atomically(stage_dir / HTML, page)
