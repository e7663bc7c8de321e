"""The prepare stage as the daemon runs it: a real child process on a stage directory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, REPO
from trainbox.fsio import write_json_atomically
from trainbox.jobspec import JobSpec
from trainbox.rows import Example, read_examples


def run_prepare(tmp: Path, datasets: list[Path], **job: object) -> Path:
    stage_dir = tmp / "prepare"
    stage_dir.mkdir(parents=True)
    refs = []
    for path in datasets:
        info, _ = read_examples(path)
        refs.append({"name": path.name, "sha256": info.sha256, "path": str(path), "format": info.format,
                     "rows": info.rows})
    spec = JobSpec.model_validate({"name": "p", "datasets": [p.name for p in datasets], **job})
    write_json_atomically(stage_dir / "stage.json", {
        "job_id": "j", "stage": "prepare", "home": str(tmp), "job": spec.model_dump(mode="json"),
        "datasets": refs, "stage_dirs": {"prepare": str(stage_dir)}, "results": {}})
    proc = subprocess.run([sys.executable, "-m", "handlers", "prepare", str(stage_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return stage_dir


def split_ids(stage_dir: Path) -> dict[str, set[str]]:
    return {name: {Example.from_json(line).id for line in (stage_dir / "splits" / f"{name}.jsonl").read_text().splitlines()}
            for name in ("train", "val", "test")}


def many_rows(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "a", encoding="utf-8") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"text": f"sentence number {i}", "label": ["ALLOW", "DENY"][i % 2]}) + "\n")
    return path


def test_splits_stats_and_result(tmp_path: Path) -> None:
    data = many_rows(tmp_path / "d.jsonl", 400)
    stage = run_prepare(tmp_path / "a", [data])
    ids = split_ids(stage)
    assert sum(map(len, ids.values())) == 400 and not (ids["train"] & ids["test"])
    assert 280 <= len(ids["train"]) <= 360 and len(ids["val"]) >= 20 and len(ids["test"]) >= 20
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["format"] == "classification" and stats["labels"] == {"ALLOW": 200, "DENY": 200}
    assert stats["rows"] == {k: len(v) for k, v in ids.items()}
    assert set(stats["text_length_chars"]) == {"p5", "p25", "p50", "p75", "p95", "p100"}
    result = json.loads((stage / "result.json").read_text())
    assert result["artifacts"]["train"] == "splits/train.jsonl" and result["summary"]["rows"] == stats["rows"]


def test_appending_rows_never_moves_an_existing_row(tmp_path: Path) -> None:
    data = many_rows(tmp_path / "d.jsonl", 300)
    before = split_ids(run_prepare(tmp_path / "a", [data]))
    many_rows(data, 100, start=300)
    after = split_ids(run_prepare(tmp_path / "b", [data]))
    for name in before:
        assert before[name] <= after[name], f"a {name} row moved to another split"


def test_several_datasets_are_concatenated_deduplicated_and_shuffled_by_seed(tmp_path: Path) -> None:
    a, b = FIXTURES / "alpaca.jsonl", FIXTURES / "messages.jsonl"
    dup = tmp_path / "dup.jsonl"
    dup.write_text((FIXTURES / "alpaca.jsonl").read_text().splitlines()[0] + "\n")
    stage = run_prepare(tmp_path / "a", [a, b, dup], seed=1)
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["formats"] == {"alpaca": 13, "messages": 12} and stats["duplicates_dropped"] == 1
    assert sum(stats["rows"].values()) == 24
    order = lambda s: (s / "splits" / "train.jsonl").read_text()  # noqa: E731
    assert order(run_prepare(tmp_path / "b", [a, b, dup], seed=1)) == order(stage)
    assert order(run_prepare(tmp_path / "c", [b, a, dup], seed=1)) == order(stage), "input order does not matter"
    assert order(run_prepare(tmp_path / "d", [a, b, dup], seed=2)) != order(stage)


def test_kto_undesirable_answers_are_never_targets(tmp_path: Path) -> None:
    rows = []
    for i in range(30):
        prompt = [{"role": "user", "content": f"question {i}"}]
        rows.append({"messages": prompt + [{"role": "assistant", "content": f"good answer {i}"}], "label": True})
        if i < 20:  # 20 undesirable answers pair up; the 5 below have no desirable answer to their prompt
            rows.append({"messages": prompt + [{"role": "assistant", "content": f"bad answer {i}"}], "label": False})
    for i in range(5):
        rows.append({"messages": [{"role": "user", "content": f"lonely {i}"},
                                  {"role": "assistant", "content": f"bad lonely {i}"}], "label": False})
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stage = run_prepare(tmp_path / "a", [data])
    out = [Example.from_json(line) for name in ("train", "val", "test")
           for line in (stage / "splits" / f"{name}.jsonl").read_text().splitlines()]
    pairs = [ex for ex in out if ex.kind == "preference"]
    targets = [m["content"] for ex in out if ex.kind != "preference" for m in ex.messages if m["role"] == "assistant"]
    assert len(out) == 50 and len(pairs) == 20 and all(t.startswith("good") for t in targets)
    assert all(p.rejected.startswith("bad") and p.chosen.startswith("good") for p in pairs)
    result = json.loads((stage / "result.json").read_text())
    assert "5 undesirable answer(s) dropped on line(s) 51, 52, 53, 54, 55" in result["message"]
