"""Hostile and unlucky inbox entries, in-process with a real store and real files (issue 10).

Each case ends as a normal rejection that says what and how to fix, in bounded time, without reading
anything outside the home; nothing a user dropped is replaced.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from daemon.config import DaemonSettings, load_settings
from daemon.ingest import MAX_RECOVER_ATTEMPTS, Ingestor
from daemon.layout import Layout
from daemon.status import rejected_files
from daemon.store import Store
from trainbox.errors import InvalidInput

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LAUGHS = "name: lol\ndatasets: [x]\nlol0: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"lol{i}: &{chr(97 + i)} [{','.join([f'*{chr(96 + i)}'] * 9)}]\n" for i in range(1, 9))


class Sent(list):
    def __call__(self, event: str, title: str, message: str, **data: object) -> None:
        self.append((event, title, message))


def make_ingestor(home: Path, **settings: object) -> Ingestor:
    layout = Layout(home)
    layout.create()
    return Ingestor(layout, Store.for_home(home), DaemonSettings.model_validate(settings), gpu_count=0,
                    notify=Sent())


@pytest.fixture
def ing(tmp_path: Path) -> Ingestor:
    return make_ingestor(tmp_path / "home", default_job={"enabled": False})


def put(ing: Ingestor, name: str, content: bytes | str) -> Path:
    path = ing.layout.inbox / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    ing.ingest(path)
    return path


def reasons(ing: Ingestor) -> dict[str, str]:
    return {r["file"]: Path(r["error_file"]).read_text(encoding="utf-8") for r in rejected_files(ing.layout)}


def assert_cleanly_rejected(ing: Ingestor, text: str) -> None:
    assert "trainbox failed while reading" not in text, text
    assert "fix:" in text, text
    assert not list(ing.layout.ingesting.iterdir()) and not list(ing.layout.inbox.iterdir())


# YAML ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,body,expected", [
    ("laughs", LAUGHS, "more than 20000 values"),
    ("cycle", "name: a\ndatasets: &d [*d]\n", "nested more than 64 levels"),
    ("flow", "name: a\ndatasets: " + "[" * 60_000, "nested more than 64 levels"),
    ("block", "name: a\ndatasets:\n" + "".join("  " * i + "- \n" for i in range(100)), "nested more than 64"),
    ("tag", "name: a\ndatasets: !!python/object/apply:os.system ['true']\n", "tag !!python/object/apply"),
    ("local-tag", "name: !secret a\ndatasets: [x]\n", "the tag !secret is not allowed"),
    ("bigint", "name: a\ndatasets: [x]\nseed: " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
    ("unhashable", "name: a\ndatasets: [x]\n? [a, b]\n: c\n", "unhashable key"),
])
def test_hostile_yaml_is_a_quick_normal_rejection_with_a_position(ing: Ingestor, case: str, body: str,
                                                                   expected: str) -> None:
    started = time.monotonic()
    put(ing, f"{case}.yaml", body)
    took = time.monotonic() - started
    text = reasons(ing)[f"{case}.yaml"]
    assert expected in text and f"{case}.yaml:" in text.split("\n\n", 1)[1].split("\n")[1], text
    assert_cleanly_rejected(ing, text)
    assert took < 5, f"{case} took {took:.1f}s"


def test_a_job_file_over_the_cap_is_rejected_unread(ing: Ingestor) -> None:
    put(ing, "huge.yaml", "name: a\ndatasets: [x]\n# " + "x" * 70_000 + "\n")
    text = reasons(ing)["huge.yaml"]
    assert "over the 64000-byte limit for a job file" in text
    assert_cleanly_rejected(ing, text)


def test_anchors_within_bounds_still_work(ing: Ingestor) -> None:
    put(ing, "a.yaml", "name: a\ndatasets: &d [x]\nstages: [prepare]\nevaluate: {}\n")
    assert ing.store.all_jobs()[0].spec.datasets == ["x"]


# entries that are not regular files --------------------------------------------------------------
def _links(tmp_path: Path, inbox: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.jsonl").write_bytes((FIXTURES / "text.jsonl").read_bytes())
    (outside / "job.yaml").write_text("name: a\ndatasets: [x]\n")
    made = {"zero.jsonl": Path("/dev/zero"), "dir.jsonl": outside, "dangling.jsonl": outside / "missing",
            "outside.jsonl": outside / "data.jsonl", "outside.yaml": outside / "job.yaml",
            "passwd.jsonl": Path("/etc/passwd")}
    for name, target in made.items():
        (inbox / name).symlink_to(target)
    return made


def test_links_fifos_and_sockets_are_set_aside_unopened(ing: Ingestor, tmp_path: Path) -> None:
    inbox = ing.layout.inbox
    links = _links(tmp_path, inbox)
    os.mkfifo(inbox / "pipe.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.jsonl"))
    before = {p: os.stat(p).st_atime_ns for p in (tmp_path / "outside").iterdir()}
    from daemon.inbox import InboxWatcher
    from daemon.config import WatchSettings

    watcher = InboxWatcher(inbox, WatchSettings(stable_seconds=0.1))
    watcher.rescan()
    ready = watcher.ready_files()  # not regular: ready at once, nothing to wait for
    assert sorted(p.name for p in ready) == sorted([*links, "pipe.jsonl", "sock.jsonl"])
    started = time.monotonic()
    for path in ready:
        ing.ingest(path)
    assert time.monotonic() - started < 5, "nothing blocked (a FIFO open would hang forever)"
    sock.close()
    found = reasons(ing)
    assert sorted(found) == sorted([*links, "pipe.jsonl", "sock.jsonl"])
    for name in links:
        assert "this is a symbolic link, not a regular file; trainbox did not open or follow it" in found[name]
        assert os.path.islink(ing.layout.rejected / name), "the link itself is kept, as dropped"
    assert "named pipe (FIFO)" in found["pipe.jsonl"] and "a socket" in found["sock.jsonl"]
    for text in found.values():
        assert_cleanly_rejected(ing, text)
    assert not ing.store.all_datasets() and not ing.store.all_jobs()
    assert {p: os.stat(p).st_atime_ns for p in (tmp_path / "outside").iterdir()} == before


def test_a_link_claimed_before_a_crash_is_set_aside_by_recover(ing: Ingestor) -> None:
    claim = ing.layout.ingesting / "20260101000000-abcdef12__zero.jsonl"
    claim.symlink_to("/dev/zero")
    pipe = ing.layout.ingesting / "20260101000000-abcdef13__pipe.jsonl"
    os.mkfifo(pipe)
    ing.recover()
    assert sorted(reasons(ing)) == ["pipe.jsonl", "zero.jsonl"]
    assert not list(ing.layout.ingesting.iterdir())


def test_a_claim_that_stopped_the_daemon_repeatedly_is_set_aside(ing: Ingestor) -> None:
    claim = ing.layout.ingesting / "20260101000000-abcdef12__lol.yaml"
    claim.write_text("name: a\ndatasets: [x]\n")
    for _ in range(MAX_RECOVER_ATTEMPTS):  # as if every earlier start had died while reading it
        ing.store.count_recover_attempt("20260101000000-abcdef12")
    ing.recover()
    text = reasons(ing)["lol.yaml"]
    assert f"trainbox stopped {MAX_RECOVER_ATTEMPTS + 1} times while reading this file" in text
    assert not ing.store.all_jobs() and not ing.store.claim_attempts()


# names --------------------------------------------------------------------------------------------
def test_a_name_too_long_to_claim_is_rejected_and_the_next_file_goes_on(ing: Ingestor) -> None:
    long_name = "d" * 240 + ".jsonl"  # 246 bytes: legal, but not once prefixed for the claim
    put(ing, long_name, (FIXTURES / "text.jsonl").read_bytes())
    (entry,) = rejected_files(ing.layout)
    assert entry["file"].startswith("d" * 100) and entry["file"].endswith("~shortened.jsonl")
    text = Path(entry["error_file"]).read_text(encoding="utf-8")
    assert "File name too long (246-byte name)" in text and "rename it to a shorter name" in text
    assert Path(entry["path"]).read_bytes() == (FIXTURES / "text.jsonl").read_bytes()
    put(ing, "next.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    assert [d["name"] for d in ing.store.all_datasets()] == ["next.jsonl"]


def test_names_that_are_not_utf8_or_hold_control_characters_are_shown_escaped(ing: Ingestor) -> None:
    name = os.fsdecode(b"caf\xe9.jsonl")
    put(ing, name, (FIXTURES / "text.jsonl").read_bytes())
    assert [d["name"] for d in ing.store.all_datasets()] == ["caf\\xe9.jsonl"]
    put(ing, "two\nlines.jsonl", (FIXTURES / "alpaca.jsonl").read_bytes())  # no forged log or header lines
    assert [d["name"] for d in ing.store.all_datasets()] == ["caf\\xe9.jsonl", "two\\nlines.jsonl"]
    put(ing, os.fsdecode(b"bad\xff.jsonl"), "not json\n")
    assert "bad\\xff.jsonl:1:1: not valid JSON" in reasons(ing)[os.fsdecode(b"bad\xff.jsonl")]


def test_explanations_never_replace_a_dropped_file(ing: Ingestor) -> None:
    put(ing, "c.jsonl.error.txt", "the user's own notes\n")
    put(ing, "c.jsonl", "not json\n")
    (ing.layout.rejected / "d.jsonl").write_text("put there by hand\n")
    put(ing, "d.jsonl", "not json either\n")
    kept = {p.name: p.read_bytes() for p in ing.layout.rejected.iterdir()}
    assert kept["c.jsonl.error-dropped.txt"] == b"the user's own notes\n"
    assert "unsupported file type" in kept["c.jsonl.error-dropped.txt.error.txt"].decode()
    assert "not valid JSON" in kept["c.jsonl.error.txt"].decode()
    assert kept["d.jsonl"] == b"put there by hand\n"
    (mine,) = [n for n in kept if n.startswith("d.") and n.endswith(".jsonl") and n != "d.jsonl"]
    assert kept[mine] == b"not json either\n"
    assert len(rejected_files(ing.layout)) == 3


# JSON Lines ---------------------------------------------------------------------------------------
def test_unicode_line_separators_inside_strings_are_data(ing: Ingestor) -> None:
    rows = [{"prompt": f"a\u2028b\u2029c\x85d {i}", "completion": "ok"} for i in range(3)]
    put(ing, "seps.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (ds,) = ing.store.all_datasets()
    assert ds["rows"] == 3 and not rejected_files(ing.layout)


@pytest.mark.parametrize("case,line,expected", [
    ("deep", '{"text": ' + "[" * 5000 + "]" * 5000 + "}", "2:5009: values are nested too deeply"),
    ("surrogate", '{"text": "cut \\ud830 here"}', "2:15: \\ud830 is half of a UTF-16 surrogate pair"),
    ("bigint", '{"text": "x", "n": ' + "7" * 5000 + "}", "2:20: a number with 5000 digits"),
])
def test_valid_looking_json_python_cannot_hold_is_explained(ing: Ingestor, case: str, line: str,
                                                              expected: str) -> None:
    put(ing, f"{case}.jsonl", '{"text": "fine"}\n' + line + "\n")
    text = reasons(ing)[f"{case}.jsonl"]
    assert f"{case}.jsonl:{expected}" in text, text
    assert_cleanly_rejected(ing, text)


@pytest.mark.parametrize("line", ["5", '"chosen"', "null", "[1, 2]", "true"])
def test_a_line_that_is_json_but_not_an_object_is_a_normal_rejection(ing: Ingestor, line: str) -> None:
    put(ing, "scalar.jsonl", line + "\n")
    text = reasons(ing)["scalar.jsonl"]
    assert "scalar.jsonl:1: a line must be a JSON object" in text and "trainbox failed" not in text


def test_a_dataset_over_the_size_limit_is_rejected_unread(tmp_path: Path) -> None:
    ing = make_ingestor(tmp_path / "home", limits={"max_dataset_mb": 0.001})
    put(ing, "big.jsonl", '{"text": "' + "x" * 2000 + '"}\n')
    text = reasons(ing)["big.jsonl"]
    assert "over the 1000-byte limit for a dataset" in text and "limits.max_dataset_mb" in text


def test_a_bad_preference_pair_is_explained_once_with_the_count(ing: Ingestor) -> None:
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
           "rejected": {"from": "human", "value": "b"}}
    put(ing, "dpo.jsonl", "".join(json.dumps(row) + "\n" for _ in range(40)))
    text = reasons(ing)["dpo.jsonl"]
    assert text.count("'rejected' must be the assistant's answer") == 1 and "the same on 39 more line(s)" in text
    assert "a preference pair is the prompt" in text


# jobs that could never start ----------------------------------------------------------------------
def test_a_job_naming_a_same_content_copy_uses_the_stored_dataset(ing: Ingestor) -> None:
    put(ing, "first.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    put(ing, "copy.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    assert "duplicate dataset" in reasons(ing)["copy.jsonl"]
    put(ing, "j.yaml", "name: j\ndatasets: [copy]\nstages: [prepare]\n")
    (job,) = ing.store.all_jobs()
    assert job.state == "queued" and job.datasets == [ing.store.all_datasets()[0]["sha256"]]


def test_a_job_whose_dataset_was_rejected_says_so(ing: Ingestor) -> None:
    put(ing, "j.yaml", "name: j\ndatasets: [prefs]\nstages: [prepare]\n")
    put(ing, "prefs.jsonl", "not json\n")
    (job,) = ing.store.all_jobs()
    assert job.state == "waiting"
    assert "prefs.jsonl was rejected" in job.error and "prefs.jsonl.error.txt" in job.error
    assert any(title == "trainbox: job j cannot start" for _, title, _ in ing.notify)
    put(ing, "later.yaml", "name: later\ndatasets: [prefs.jsonl]\nstages: [prepare]\n")
    assert "prefs.jsonl was rejected" in ing.store.find_job("later").error, "also for a job dropped after"
    put(ing, "prefs.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    assert all(j.state == "queued" and j.error is None for j in ing.store.all_jobs())


@pytest.mark.parametrize("pattern", ["../../etc/passwd", "/etc/passwd", "..", "sub/data.jsonl"])
def test_dataset_patterns_that_can_never_match_are_rejected_at_drop(ing: Ingestor, pattern: str) -> None:
    put(ing, "j.yaml", f"name: j\ndatasets: ['{pattern}']\n")
    text = reasons(ing)["j.yaml"]
    assert "j.yaml:2:11: datasets:" in text and "can never match a dropped dataset" in text
    assert not ing.store.all_jobs()


def test_a_default_job_typo_is_reported_when_settings_load(tmp_path: Path) -> None:
    (tmp_path / "daemon.yaml").write_text("default_job:\n  job:\n    train: {max_stpes: 3}\n")
    with pytest.raises(InvalidInput) as caught:
        load_settings(tmp_path)
    text = caught.value.render()
    assert "daemon.yaml:3:13: default_job.job.train.max_stpes: is not a field" in text
    assert "did you mean default_job.job.train.max_steps?" in text


def test_a_hard_link_is_stored_as_a_private_copy(ing: Ingestor, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes((FIXTURES / "text.jsonl").read_bytes())
    os.link(outside, ing.layout.inbox / "linked.jsonl")
    ing.ingest(ing.layout.inbox / "linked.jsonl")
    (ds,) = ing.store.all_datasets()
    stored = ing.layout.home / ds["path"]
    assert stored.read_bytes() == outside.read_bytes() and not stored.samefile(outside)
    outside.write_text('{"text": "changed later"}\n')
    assert stored.read_bytes() == (FIXTURES / "text.jsonl").read_bytes(), "the recorded hash still holds"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000 anyway")
def test_an_unreadable_file_is_rejected_not_taken_for_a_storage_failure(ing: Ingestor) -> None:
    path = ing.layout.inbox / "locked.jsonl"
    path.write_bytes((FIXTURES / "text.jsonl").read_bytes())
    path.chmod(0)
    ing.ingest(path)
    text = reasons(ing)["locked.jsonl"]
    assert "cannot be read: Permission denied" in text and "chmod u+r" in text


def test_a_bare_dataset_gets_its_default_job_once_even_after_a_storage_failure(tmp_path: Path,
                                                                                monkeypatch) -> None:
    import errno

    import daemon.ingest

    ing = make_ingestor(tmp_path / "home", default_job={"delay_seconds": 0, "job": {"stages": ["prepare"]}})
    put(ing, "bare.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    real_write = daemon.ingest.write_text_atomically

    def disk_full(path, text):  # the job record is stored, then its job.yaml cannot be written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(daemon.ingest, "write_text_atomically", disk_full)
    with pytest.raises(OSError):
        ing.create_due_default_jobs()
    assert ing.store.all_datasets()[0]["default_job_due"] is not None, "still due: not lost"
    monkeypatch.setattr(daemon.ingest, "write_text_atomically", real_write)
    ing.create_due_default_jobs()
    ing.create_due_default_jobs()
    (job,) = ing.store.all_jobs()
    assert job.spec.datasets == [ing.store.all_datasets()[0]["sha256"]] and job.state == "queued"
    assert ing.store.all_datasets()[0]["default_job_due"] is None
