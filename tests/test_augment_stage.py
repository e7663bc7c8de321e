"""The augment stage with the rules backend and the packaged sentence encoder, on the CC0 persona fixture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from augment_fixtures import PERSONA, augmented_rows, make_augment_stage
from handlers.augment import quality, rules
from handlers.augment.dedup import Deduplicator, normalised_hash
from handlers.augment.stage import auto_multiplier, run_augment
from handlers.context import load_context
from trainbox.errors import StageFailed, StopRequested
from trainbox.rows import read_examples

SETTINGS = {"multiplier": 3, "min_quality": 0.5}


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """One run on the 80 persona rows (3x), in process: (stage dir, result)."""
    stage = make_augment_stage(tmp_path_factory.mktemp("augment"), SETTINGS)
    return stage, run_augment(load_context(stage))


def test_every_row_is_traced_to_its_source_and_tagged_by_kind(augmented) -> None:
    stage, result = augmented
    rows = augmented_rows(stage)
    originals = {ex.id: ex for ex in read_examples(PERSONA)[1]}
    assert len(rows) == 240 and result.summary["rows_total"] == 240 and result.summary["ratio"] == 3.0
    assert [r["id"] for r in rows[:80]] == list(originals) and all(r["kind"] == "original" for r in rows[:80])
    generated = rows[80:]
    assert {r["kind"] for r in generated} == {"style_transfer", "scenario", "relationship", "hard_negative"}
    for row in generated:
        provenance = row["meta"]["provenance"]
        assert row["source_id"] in originals and provenance["technique"] == row["kind"]
        assert 0.5 <= provenance["quality"] <= 1 and provenance["quality_level"] in ("high", "medium")
        source = originals[row["source_id"]]
        if row["kind"] == "hard_negative":  # a pair: the prompt, the source's reply chosen, a wrong one rejected
            assert row["messages"][-1]["role"] == "user" and row["chosen"] == source.messages[-1]["content"]
            assert row["rejected"] and row["rejected"] != row["chosen"]
        else:
            assert row["messages"][-1]["role"] == "assistant" and row["rejected"] is None
            assert row["messages"][-1]["content"] != source.messages[-1]["content"]
    styles = [r for r in generated if r["kind"] == "style_transfer"]
    assert all(r["meta"]["style"] in r["messages"][0]["content"].lower() or r["meta"]["style"] in
               ("informal", "concise", "detailed", "direct", "tactful") for r in styles)
    assert any(r["meta"]["provenance"]["target"] == "similar_situation" for r in generated)


def test_stats_summary_and_message_agree(augmented) -> None:
    stage, result = augmented
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["rows_original"] == 80 and stats["rows_generated"] == 160
    assert sum(k["rows"] for k in stats["per_kind"].values()) == 160
    assert sum(stats["quality_levels"].values()) == 160
    assert stats["candidates"] == 160 + stats["dropped_low_quality"] + stats["duplicates_exact"] \
        + stats["duplicates_near"] + stats["not_needed"]
    assert result.message.startswith("80 -> 240, 3.00x (style_transfer ")
    page = (stage / "augment_summary.html").read_text()
    assert "80 &rarr; 240 rows, 3.00x" in page and page.count("<h3>") == 4
    assert result.artifacts["train"] == "augmented/train.jsonl"


def test_a_stopped_run_with_a_torn_journal_resumes_to_the_same_bytes(augmented, tmp_path: Path) -> None:
    stage, _ = augmented
    copy = tmp_path / "augment"
    shutil.copytree(stage, copy)
    journal = copy / "augmented" / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:31]) + b"\n" + lines[31][:40])  # header, 30 rows, half a record
    (copy / "augmented" / "train.jsonl").unlink()
    stopping = load_context(copy)
    stopping.request_stop()
    with pytest.raises(StopRequested, match="augmented 30 of 80 source rows"):
        run_augment(stopping)
    assert journal.read_bytes() == b"\n".join(lines[:31]) + b"\n"  # the torn record is cut off
    run_augment(load_context(copy))
    assert journal.read_bytes() == (stage / "augmented" / "journal.jsonl").read_bytes()
    assert (copy / "augmented" / "train.jsonl").read_bytes() == (stage / "augmented" / "train.jsonl").read_bytes()


def test_too_few_rows_fail_before_any_work(tmp_path: Path) -> None:
    stage = make_augment_stage(tmp_path, {"min_rows": 50}, rows=30)
    with pytest.raises(StageFailed, match=r"Insufficient samples: 30 < 50 .*lower augment.min_rows"):
        run_augment(load_context(stage))
    assert not (stage / "augmented").exists()


@pytest.mark.parametrize("rows,expected", [(30, 5.0), (100, 5.0), (150, 3.5), (200, 2.0), (350, 1.75),
                                           (500, 1.5), (2000, 1.5)])
def test_auto_multiplier(rows: int, expected: float) -> None:
    value, rule = auto_multiplier(rows)
    assert value == pytest.approx(expected) and str(rows) in rule


def test_quality_scores_junk_low_and_rewrites_high() -> None:
    source = "I would be glad to help on Saturday. I can arrive at ten o'clock if that suits you."
    assert quality.score(rules.informal(source), source, 0.93) >= 0.75
    assert quality.score("Ich kann am Samstag leider nicht helfen, tut mir leid.", source, 0.93) < 0.5
    assert quality.score("Sure! [insert name] will help {name}", source, 0.93) < 0.5
    assert quality.score("ok " * 200, source, 0.93) < 0.5
    assert quality.score(source, source, 0.2) == 0
    assert [quality.level(q) for q in (0.9, 0.6, 0.1)] == ["high", "medium", "low"]


def test_rules_rewrites_change_the_register_and_keep_sentences_whole() -> None:
    text = "Whoa, big move. What's going on? I think you should talk to them, don't you?"
    assert rules.concise(text) == "Whoa, big move. What's going on?"
    assert rules.direct(text) == "Whoa, big move. What's going on? You should talk to them, don't you?"
    assert rules.formal("Hey, I'm gonna be late!") == "Hello, I am going to be late."
    assert rules.informal("Thank you, I do not know yet.") == "Thanks, I don't know yet."
    assert rules.tactful("You should leave now.").startswith("I understand, and I hope this helps. You might consider")
    assert rules.rewrite("relationship:authority", "Sure, I'll do it.") == "Certainly, I will do it."


def test_dedup_exact_after_normalising_and_near_by_shingles() -> None:
    import numpy as np

    assert normalised_hash("Hello,  World!") == normalised_hash("hello world")
    dedup = Deduplicator(0.97)
    long = ("we could meet at the station at ten and then walk to the market together, buy some bread and fruit, "
            "sit by the river for an hour and still be back home well before lunch")
    e = np.ones(4, dtype=np.float32) / 2
    assert dedup.offer("a", long, "p", e)
    assert not dedup.offer("b", long.upper() + "!", "q", None)
    assert not dedup.offer("c", long.replace("lunch", "noon"), "r", None)
    assert not dedup.offer("d", "something else entirely", "p", e)  # same prompt, same meaning
    assert dedup.offer("e", "something else entirely", "other prompt", e)
    assert (dedup.exact, dedup.near) == (1, 2)
