"""Property-based fuzz of ingest: whatever lands in the inbox ends accepted or rejected with a reason."""
from __future__ import annotations

import json
import tempfile
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
files = st.tuples(st.sampled_from([".jsonl", ".yaml", ".yml", ".txt", ""]),
                  st.lists(line_bytes, max_size=6).map(lambda ls: b"\n".join(ls)),
                  st.sampled_from([b"", b"\xef\xbb\xbf"]), st.booleans())


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
        accepted = len(store.datasets) + len(store.jobs)
        rejected = rejected_files(layout)
        assert accepted + len(rejected) == 1, "exactly one outcome"
        if rejected:
            assert rejected[0]["reason"].strip(), "a rejection always says why"
            assert (layout.rejected / rejected[0]["file"]).read_bytes() == data, "the file is kept as it was"
        else:
            kept = list(layout.datasets.iterdir()) + list(layout.jobs.glob("*/job.yaml"))
            assert [p.read_bytes() for p in kept] == [data]
        assert not list(layout.inbox.iterdir()) and not list(layout.ingesting.iterdir())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files)
def test_every_file_ends_accepted_or_rejected_with_a_reason(case: tuple) -> None:
    _ingest_once(*case)


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(files, min_size=40, max_size=40))
def test_the_daemon_survives_a_burst_of_fuzzed_files(home: Path, daemon_factory, batch: list) -> None:
    d = daemon_factory().wait_ready()
    for i, (suffix, body, bom, crlf) in enumerate(batch):
        drop(home / "inbox", f"f{i:02d}{suffix}", bom + (body.replace(b"\n", b"\r\n") if crlf else body))
    wait_for(lambda: not list((home / "inbox").iterdir()), 30, "inbox drained")
    store = read_store(home)
    wait_for(lambda: len(read_store(home).datasets) + len(rejected_files(Layout(home)))
             + len([j for j in read_store(home).all_jobs() if j["source"].startswith("inbox/")]) == 40,
             30, "every file has one outcome")
    assert d.proc.poll() is None, "the daemon is still running"
    assert store.get_meta("daemon")["pid"] == d.proc.pid
