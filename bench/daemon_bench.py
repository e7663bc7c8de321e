"""Daemon benchmark: inbox latency (file complete -> job queued) and bulk ingest time.

Runs a real ``trainbox run`` process on a temporary home and prints a table; nothing is asserted.
Targets on a 2-core machine: p95 latency under 1 s; 1,000 files ingested in under 30 s.

    .venv/bin/python bench/daemon_bench.py [--drops 200] [--files 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.store import Store  # noqa: E402


def start_daemon(home: Path, settings: dict) -> subprocess.Popen:
    (home / "daemon.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--home", str(home)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (home / "state" / "trainbox.json").exists():
            beat = Store.for_home(home, readonly=True).get_meta("daemon")
            if beat and beat.get("pid") == proc.pid:
                return proc
        time.sleep(0.05)
    raise RuntimeError("daemon did not start")


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def wait_until(predicate, timeout: float = 120.0, poll: float = 0.005) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(poll)
    raise TimeoutError


def latency(mode: str, drops: int) -> list[float]:
    """Seconds from the moment a job file is complete to the job being queued."""
    settings = {"concurrency": {"cpu_jobs": 0}, "notify": {"backends": {"desktop": False}},
                "default_job": {"enabled": False}}
    if mode == "stability window only":
        settings["watch"] = {"use_close_events": False}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        proc = start_daemon(home, settings)
        inbox = home / "inbox"
        (inbox / "data.jsonl").write_text('{"text": "hello"}\n')
        wait_until(lambda: Store.for_home(home, readonly=True).dataset_count() == 1)
        out = []
        for i in range(drops):
            body = f"name: lat{i}\ndatasets: [data]\nstages: [prepare]\n"
            if mode == "atomic rename":
                (inbox / f".j{i}.tmp").write_text(body)
                os.replace(inbox / f".j{i}.tmp", inbox / f"j{i}.yaml")
            else:
                with open(inbox / f"j{i}.yaml", "w") as fh:
                    fh.write(body)
            t0 = time.monotonic()
            store = Store.for_home(home, readonly=True)
            t1 = wait_until(lambda store=store, n=i + 1: len(store.all_jobs()) == n)
            out.append(t1 - t0)
        stop_daemon(proc)
    return out


def bulk(files: int) -> tuple[float, int]:
    settings = {"notify": {"backends": {"desktop": False}}, "default_job": {"enabled": False}}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        proc = start_daemon(home, settings)
        staging = home / "staging"
        staging.mkdir()
        for i in range(files):
            (staging / f"b{i:04d}.jsonl").write_text(json.dumps({"text": f"bulk row {i}"}) + "\n")
        t0 = time.monotonic()
        for p in staging.iterdir():  # "dropped at once": renamed in as fast as the OS allows
            os.replace(p, home / "inbox" / p.name)
        t1 = wait_until(lambda: Store.for_home(home, readonly=True).dataset_count() == files, timeout=600, poll=0.1)
        count = Store.for_home(home, readonly=True).dataset_count()
        stop_daemon(proc)
    return t1 - t0, count


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=200)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.system()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"\nlatency from file complete to job queued ({args.drops} drops each)")
    print(f"{'how the file arrives':<28}{'p50 s':>8}{'p95 s':>8}{'max s':>8}")
    rows = {}
    for mode in ("written in place", "atomic rename", "stability window only"):
        lat = latency(mode, args.drops)
        rows[mode] = lat
        print(f"{mode:<28}{pct(lat, 50):>8.3f}{pct(lat, 95):>8.3f}{max(lat):>8.3f}")
    base = pct(rows["stability window only"], 95)
    print(f"p95 speed-up of close/rename events over a stability-window poller: "
          f"{base / pct(rows['written in place'], 95):.1f}x (in place), "
          f"{base / pct(rows['atomic rename'], 95):.1f}x (rename)")
    seconds, count = bulk(args.files)
    print(f"\n{count} files dropped at once: all ingested in {seconds:.1f} s ({count / seconds:.0f} files/s; target < 30 s)")


if __name__ == "__main__":
    main()
