"""Job YAML validation: every error names the line, column, key path and a fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainbox.errors import InvalidInput
from trainbox.jobfile import load_job_file, parse_job_text
from trainbox.jobspec import JobSpec

REPO = Path(__file__).resolve().parent.parent


def errors_of(text: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_job_text(text, "job.yaml")
    return info.value


def test_minimal_job_gets_defaults() -> None:
    spec = parse_job_text("name: a\ndatasets: data.jsonl\n", "job.yaml")
    assert spec.datasets == ["data.jsonl"]
    assert spec.stages == ["prepare", "train", "evaluate", "export"]
    assert spec.train.checkpoint.interval_seconds == 180 and spec.train.checkpoint.keep == 5


def test_unknown_key_has_did_you_mean_with_line_and_column() -> None:
    err = errors_of("name: a\ndatasets: [d]\ntrain:\n  max_stpes: 10\n")
    (problem,) = err.problems
    assert (problem.line, problem.column, problem.key) == (4, 3, "train.max_stpes")
    assert problem.fix == "did you mean train.max_steps?"
    assert "job.yaml:4:3: train.max_stpes: is not a field" in err.render()


def test_wrong_type_and_range_name_the_key_path() -> None:
    err = errors_of("name: a\ndatasets: [d]\ntrain:\n  lora:\n    r: many\n  learning_rate: -1\n")
    by_key = {p.key: p for p in err.problems}
    assert by_key["train.lora.r"].line == 5
    assert "integer" in by_key["train.lora.r"].message
    assert by_key["train.learning_rate"].line == 6
    assert "greater than 0" in by_key["train.learning_rate"].message


def test_syntax_error_has_line_and_column() -> None:
    err = errors_of("name: a\ndatasets: [d\ntrain: {}\n")
    assert err.summary == "not valid YAML"
    assert err.problems[0].line == 3 and err.problems[0].column is not None


def test_missing_required_keys() -> None:
    err = errors_of("seed: 3\n")
    assert {p.key for p in err.problems} == {"name", "datasets"}
    assert all("missing" in p.message for p in err.problems)


def test_duplicate_key_is_an_error() -> None:
    err = errors_of("name: a\ndatasets: [d]\nname: b\n")
    assert err.problems[0].line == 3 and "twice" in err.problems[0].message


def test_stage_order_and_split_sum() -> None:
    err = errors_of("name: a\ndatasets: [d]\nstages: [train, prepare]\nprepare:\n  split: {train: 0.5, val: 0.1, test: 0.1}\n")
    keys = {p.key: p.message for p in err.problems}
    assert "pipeline order" in keys["stages"]
    assert "add up to 1.0" in keys["prepare.split"]


def test_empty_and_non_mapping_files() -> None:
    assert errors_of("").summary == "empty file"
    assert errors_of("- a\n- b\n").summary == "not a mapping"


def test_non_utf8_job_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "j.yaml"
    path.write_bytes(b"name: a\ndatasets: [d]\nseed: \xff\n")
    with pytest.raises(InvalidInput) as info:
        load_job_file(path)
    assert info.value.problems[0].line == 3


@pytest.mark.parametrize("example", sorted((REPO / "configs" / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_validate(example: Path) -> None:
    assert isinstance(load_job_file(example), JobSpec)


def test_yaml_11_booleans_stay_strings() -> None:
    spec = parse_job_text("name: a\ndatasets: [d]\nnotify:\n  on: [failed]\nevaluate:\n  critical_label: NO\n",
                          "job.yaml")
    assert spec.notify.on == ["failed"] and spec.evaluate.critical_label == "NO"


def test_job_reference_page_matches_the_schema() -> None:
    from daemon.schemadoc import readme_section, render

    assert readme_section((REPO / "docs" / "jobs.md").read_text(encoding="utf-8")) == render(), \
        "docs/jobs.md job reference is stale: run python -m daemon.schemadoc --write"


def test_daemon_settings_errors_are_located_too(tmp_path: Path) -> None:
    from daemon.config import load_settings

    (tmp_path / "daemon.yaml").write_text("watch:\n  rescan_secnds: 2\nconcurrency:\n  cpu_jobs: -1\n")
    with pytest.raises(InvalidInput) as info:
        load_settings(tmp_path)
    text = info.value.render()
    assert "daemon.yaml:2:3: watch.rescan_secnds: is not a field" in text
    assert "did you mean watch.rescan_seconds?" in text and "daemon.yaml:4:13: concurrency.cpu_jobs" in text
