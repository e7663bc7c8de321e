"""A storm of hostile inbox entries against a live daemon (a real child process, real inotify).

A few hundred mixed entries: valid and broken datasets, hostile YAML, links (to /dev/zero, /etc/passwd,
folders, files outside the home, nowhere), FIFOs, sockets, over-long and non-UTF-8 names, names that
look like explanation files. Afterwards: nothing lost, no internal-error reason, nothing outside the home
opened, a file dropped after the storm taken within seconds, and the daemon's peak memory bounded.
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import yaml
from watchdog.events import FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from conftest import FAST_SETTINGS, FIXTURES, drop, read_store, wait_for
from daemon.layout import Layout
from daemon.status import ERROR_SUFFIX

PEAK_RSS_LIMIT_MB = 400  # a followed /dev/zero link took 22 GB before the fix
TAKEN_AFTER_STORM_S = 5.0
HEARTBEAT_GAP_LIMIT_S = 9.0  # written every 5 s; ingest yields to it after each 1 s slice
LAUGHS = "name: lol\ndatasets: [x]\nl0: &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"l{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
BAD_JSONL = [b"not json\n", b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}\n", b'{"text": "a\\udc00"}\n',
             b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n", b"\x00\x01binary\n",
             b'{"conversations": [{"from": "human", "value": "q"}], "chosen": {}, "rejected": {}}\n' * 30]
BAD_YAML = [LAUGHS, "name: a\ndatasets: &d [*d]\n", "name: a\ndatasets: " + "[" * 50_000 + "\n",
            "name: a\ndatasets: !!python/object/apply:os.system ['true']\n", "name: a\x00\n",
            "name: a\ndatasets: ['../../etc/passwd']\n", "name: [\n"]


class Opens(FileSystemEventHandler):
    def __init__(self) -> None:
        self.opened: list[str] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileOpenedEvent):
            self.opened.append(os.fsdecode(event.src_path))


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.jsonl").write_bytes((FIXTURES / "text.jsonl").read_bytes())
    (outside / "job.yaml").write_text("name: outside\ndatasets: [data]\nstages: [prepare]\n")
    os.mkfifo(outside / "pipe.jsonl")
    (outside / "folder").mkdir()
    return outside


def _storm(inbox: Path, outside: Path, rng: random.Random) -> tuple[int, list[socket.socket]]:
    """Drop the entries; returns their number and the sockets (kept bound until the daemon is done)."""
    sockets = []
    link_targets = ["/dev/zero", "/etc/passwd", str(outside / "data.jsonl"), str(outside / "job.yaml"),
                    str(outside / "pipe.jsonl"), str(outside / "folder"), str(outside / "missing")]
    kinds = (["valid"] * 50 + ["bad_jsonl"] * 50 + ["bad_yaml"] * 40 + ["job"] * 15 + ["link"] * 45
             + ["fifo"] * 20 + ["socket"] * 5 + ["long"] * 15 + ["errname"] * 10 + ["latin1"] * 10 + ["txt"] * 10)
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        if kind == "valid":
            drop(inbox, f"v{i:03d}.jsonl", json.dumps({"text": f"storm row {i} {rng.random()}"}) + "\n")
        elif kind == "bad_jsonl":
            drop(inbox, f"b{i:03d}.jsonl", rng.choice(BAD_JSONL))
        elif kind == "bad_yaml":
            drop(inbox, f"y{i:03d}.yaml", rng.choice(BAD_YAML))
        elif kind == "job":
            drop(inbox, f"j{i:03d}.yaml", f"name: j{i}\ndatasets: [v*]\nstages: [prepare]\n")
        elif kind == "link":
            (inbox / f"l{i:03d}{rng.choice(['.jsonl', '.yaml'])}").symlink_to(rng.choice(link_targets))
        elif kind == "fifo":
            os.mkfifo(inbox / f"p{i:03d}.jsonl")
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(inbox / f"s{i:03d}.jsonl"))
            sockets.append(sock)
        elif kind == "long":
            drop(inbox, f"{i:03d}".ljust(240, "n") + ".jsonl", json.dumps({"text": f"long {i}"}) + "\n")
        elif kind == "errname":
            drop(inbox, f"e{i:03d}.jsonl{ERROR_SUFFIX}", "my own notes\n")
            drop(inbox, f"e{i:03d}.jsonl", "not json\n")
        elif kind == "latin1":
            drop(inbox, os.fsdecode(f"caf\xe9{i:03d}.jsonl".encode("latin-1")), json.dumps({"text": f"c {i}"}) + "\n")
        else:
            drop(inbox, f"t{i:03d}.txt", "some text\n")
    return len(kinds) + kinds.count("errname"), sockets


def test_a_storm_of_hostile_entries_loses_nothing_and_blocks_nothing(home: Path, daemon_factory,
                                                                      tmp_path: Path) -> None:
    settings = {**FAST_SETTINGS, "default_job": {"enabled": False}}
    (home / "daemon.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    outside = _outside(tmp_path)
    opens = Opens()
    observer = Observer()
    observer.schedule(opens, str(outside), recursive=True)
    observer.start()
    inbox = home / "inbox"
    try:
        d = daemon_factory().wait_ready()
        started = time.monotonic()
        dropped, sockets = _storm(inbox, outside, random.Random(10))
        ingesting = Layout(home).ingesting
        beats: list[float] = []

        def handled() -> bool:  # and note the heartbeat: the loop keeps beating through the storm
            beats.append((read_store(home).get_meta("daemon") or {}).get("heartbeat_ts") or 0)
            return not os.listdir(inbox) and not os.listdir(ingesting)
        wait_for(handled, 60, "the storm handled")
        for sock in sockets:
            sock.close()
        storm_s = time.monotonic() - started

        t0 = time.monotonic()
        drop(inbox, "after.jsonl", (FIXTURES / "alpaca.jsonl").read_bytes())
        wait_for(lambda: any(ds["name"] == "after.jsonl" for ds in read_store(home).all_datasets()),
                 TAKEN_AFTER_STORM_S, "a valid file dropped after the storm")
        after_s = time.monotonic() - t0

        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
        assert d.proc.poll() is None, d.output()
    finally:
        observer.stop()
        observer.join(5)

    store = read_store(home)
    rejected = [p for p in (home / "rejected").iterdir() if not p.name.endswith(ERROR_SUFFIX)]
    explanations = [p for p in (home / "rejected").iterdir() if p.name.endswith(ERROR_SUFFIX)]
    jobs = [j for j in store.all_jobs() if j.source.startswith("inbox/")]
    outcomes = len(store.all_datasets()) - 1 + len(rejected) + len(jobs)  # - after.jsonl
    gaps = [b - a for a, b in zip(sorted(set(beats)), sorted(set(beats))[1:])]
    print(f"storm: {dropped} entries in {storm_s:.1f}s, next file taken in {after_s:.2f}s, "
          f"peak RSS {peak_mb:.0f} MB, {len(rejected)} rejected, {len(store.all_datasets())} datasets, "
          f"heartbeat gaps max {max(gaps, default=0):.1f}s")
    assert outcomes == dropped, "every entry ended accepted or set aside: nothing lost"
    assert len(explanations) == len(rejected), "each set-aside entry has its explanation"
    texts = [p.read_text(encoding="utf-8") for p in explanations]
    assert not [t for t in texts if "trainbox failed while reading" in t], "no internal-error reasons"
    assert sum(os.path.islink(p) for p in rejected) == 45, "links are kept as links, never followed"
    assert [p.read_text() for p in rejected if p.name.endswith(".error-dropped.txt")] == ["my own notes\n"] * 10
    assert opens.opened == [], f"opened outside the home: {opens.opened}"
    assert peak_mb < PEAK_RSS_LIMIT_MB
    assert max(gaps, default=0) < HEARTBEAT_GAP_LIMIT_S, f"heartbeat gaps {gaps}"
