"""Property-based fuzz of ingest: whatever lands in the inbox ends accepted or rejected with a reason."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import drop, read_store, wait_for
from daemon.config import DaemonSettings
from daemon.ingest import Ingestor
from daemon.layout import Layout
from daemon.status import rejected_files
from daemon.store import Store

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
keys = st.sampled_from(["messages", "conversations", "prompt", "completion", "instruction", "input", "output",
                        "text", "label", "think", "id", "role", "content", "from", "value"])
rows = st.dictionaries(keys, json_values, max_size=4)
line_bytes = st.one_of(rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=40),
                       st.text(max_size=40).map(lambda t: t.encode("utf-8")))
# valid-looking JSON that Python cannot hold, and raw separators that are legal inside JSON strings
hostile_json = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),  # valid JSON that is not an object
    st.integers(1, 3000).map(lambda n: ('{"text": ' + "[" * n + "]" * n + "}").encode()),
    st.integers(0xD800, 0xDFFF).map(lambda c: ('{"text": "a\\u%04x b"}' % c).encode()),
    st.integers(4200, 4400).map(lambda n: ('{"text": "x", "n": ' + "9" * n + "}").encode()),
    st.text(alphabet="ab\u2028\u2029\x85\r", max_size=12).map(
        lambda t: json.dumps({"text": "x" + t}, ensure_ascii=False).encode()))
# YAML with tags, alias chains, cycles and deep nesting
hostile_yaml = st.one_of(
    st.sampled_from(["!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a}", "!foo x",
                     "!!python/name:os.system", "&a [*a]", "{? [a]: b}"]).map(
        lambda v: f"name: a\ndatasets: [x]\nextra: {v}\n".encode()),
    st.integers(1, 12).map(lambda k: ("name: a\ndatasets: [x]\nl0: &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"l{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, k))).encode()),
    st.integers(1, 3000).map(lambda n: ("name: a\ndatasets: " + "[" * n + "x" + "]" * n + "\n").encode()),
    st.integers(1, 200).map(lambda n: ("name: a\ndatasets:\n" + "".join(
        "  " * i + "-\n" for i in range(n)) + "  " * n + "- x\n").encode()),
    st.integers(4200, 4400).map(lambda n: f"name: a\ndatasets: [x]\nseed: {'9' * n}\n".encode()))
files = st.tuples(st.sampled_from([".jsonl", ".yaml", ".yml", ".txt", ""]),
                  st.lists(line_bytes | hostile_json, max_size=6).map(lambda ls: b"\n".join(ls)),
                  st.sampled_from([b"", b"\xef\xbb\xbf"]), st.booleans())
yaml_files = st.tuples(st.sampled_from([".yaml", ".yml"]), hostile_yaml, st.sampled_from([b"", b"\xef\xbb\xbf"]),
                       st.booleans())


def _ingest_once(suffix: str, body: bytes, bom: bytes, crlf: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        layout.create()
        store = Store.for_home(layout.home)
        ing = Ingestor(layout, store, DaemonSettings(), gpu_count=0, notify=lambda *a, **k: None)
        data = bom + (body.replace(b"\n", b"\r\n") if crlf else body)
        path = layout.inbox / f"fuzz{suffix}"
        path.write_bytes(data)
        ing.ingest(path)
        accepted = store.dataset_count() + len(store.all_jobs())
        rejected = rejected_files(layout)
        assert accepted + len(rejected) == 1, "exactly one outcome"
        if rejected:
            assert rejected[0]["reason"].strip(), "a rejection always says why"
            assert "trainbox failed while reading" not in rejected[0]["reason"], "never the internal-error path"
            assert (layout.rejected / rejected[0]["file"]).read_bytes() == data, "the file is kept as it was"
        else:
            kept = list(layout.datasets.iterdir()) + list(layout.jobs.glob("*/job.yaml"))
            assert [p.read_bytes() for p in kept] == [data]
        assert not list(layout.inbox.iterdir()) and not list(layout.ingesting.iterdir())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files)
def test_every_file_ends_accepted_or_rejected_with_a_reason(case: tuple) -> None:
    _ingest_once(*case)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_files)
def test_hostile_yaml_is_a_normal_rejection_in_bounded_time(case: tuple) -> None:
    started = time.monotonic()
    _ingest_once(*case)
    assert time.monotonic() - started < 5


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(files, min_size=40, max_size=40))
def test_the_daemon_survives_a_burst_of_fuzzed_files(home: Path, daemon_factory, batch: list) -> None:
    d = daemon_factory().wait_ready()
    for i, (suffix, body, bom, crlf) in enumerate(batch):
        drop(home / "inbox", f"f{i:02d}{suffix}", bom + (body.replace(b"\n", b"\r\n") if crlf else body))
    wait_for(lambda: not list((home / "inbox").iterdir()), 30, "inbox drained")
    store = read_store(home)
    wait_for(lambda: read_store(home).dataset_count() + len(rejected_files(Layout(home)))
             + len([j for j in read_store(home).all_jobs() if j.source.startswith("inbox/")]) == 40,
             30, "every file has one outcome")
    assert d.proc.poll() is None, "the daemon is still running"
    assert store.get_meta("daemon")["pid"] == d.proc.pid
