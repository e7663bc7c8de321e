"""Two daemons on two homes share one sweep through a real PostgreSQL server (Debian's packages, started here
on a temp data dir and a loopback port): every trial runs exactly once, and both see the same best trial."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from conftest import FAST_SETTINGS, REPO, jobs_json, wait_for
from daemon.layout import Layout
from trainbox.study import open_study

pytest.importorskip("psycopg2", reason="pip install 'trainbox[postgres]' (part of the dev extra)")
DATA = REPO / "configs" / "demo" / "demo_safety.jsonl"
TRIALS = 4


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name)
                                                                          else [])
    if not found:
        pytest.skip(f"PostgreSQL's {name} is not installed (apt-get install postgresql; .ci/run does)")
    return found[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    """A throwaway PostgreSQL server; as root (CI) it runs as the postgres user, which initdb requires."""
    root = Path(tempfile.mkdtemp(prefix="trainbox-pg-"))  # not under pytest's root-only temp folder
    data, port = root / "data", free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    run = [*as_user, pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, f"{run}: {done.stderr}"
    run = [*as_user, pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, f"{run}: {done.stderr}{(root / 'server.log').read_text(errors='replace')}"
    try:
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "trainbox"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/trainbox"
    finally:
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def home_for(root: Path, storage: str, study: str = "shared-sweep", **sweep: object) -> Path:
    home = root / "home"
    Layout(home).create()
    (home / "daemon.yaml").write_text(yaml.safe_dump(FAST_SETTINGS), encoding="utf-8")
    job = {"name": "shared-sweep", "kind": "sweep", "datasets": ["demo_safety.jsonl"], "stages": ["prepare", "train"],
           "seed": 11, "prepare": {"max_rows": 64, "split": {"train": 0.7, "val": 0.2, "test": 0.1}},
           "train": {"max_steps": 2, "batch_size": 8, "max_seq_length": 64},
           "sweep": {"trials": TRIALS, "metric": "final_eval_loss", "sampler": "random", "pruner": "none",
                     "storage": storage, "study": study, **sweep,
                     "params": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}}}}
    (home / "inbox" / "sweep.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    (home / "inbox" / "demo_safety.jsonl").write_bytes(DATA.read_bytes())
    return home


def test_two_daemons_share_one_study_and_run_every_trial_once(postgres_url, tmp_path) -> None:
    homes = [home_for(tmp_path / name, postgres_url) for name in ("a", "b")]
    daemons = [subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(h)],
                                stdout=subprocess.DEVNULL, stderr=open(h / "daemon.err", "w"), cwd=REPO)
               for h in homes]
    for daemon, home in zip(daemons, homes):
        assert daemon.wait(timeout=600) == 0, (home / "daemon.err").read_text()[-3000:]
    ran: list[int] = []
    bests = []
    for home in homes:
        jobs = jobs_json(home)
        (sweep,) = [j for j in jobs if j["parent"] is None]
        assert sweep["state"] == "succeeded", sweep["error"]
        ran += [j["trial"]["number"] for j in jobs if j["parent"] and j["state"] == "succeeded"]
        bests.append((sweep["stages"][1]["summary"]["best_trial"], sweep["stages"][1]["summary"]["best_value"]))
    assert sorted(ran) == list(range(TRIALS)), f"each trial exactly once across both homes: {sorted(ran)}"
    study = open_study(postgres_url, "shared-sweep", "minimize")
    counted = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert len(counted) == TRIALS and all(t.state.name == "COMPLETE" for t in counted)
    assert bests[0] == bests[1] == (study.best_trial.number, study.best_trial.value)


def test_many_daemons_opening_a_fresh_database_at_once_all_get_the_study(postgres_url, tmp_path) -> None:
    """Optuna creates its tables check-then-create; several openers on an empty database at the same moment
    once failed with ``duplicate key ... studydirection`` (CI). All of them must get the one study."""
    port = postgres_url.rsplit(":", 1)[1].split("/")[0]
    subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "race"],
                   check=True, capture_output=True)
    url = postgres_url.rsplit("/", 1)[0] + "/race"
    go = tmp_path / "go"
    opener = ("import pathlib, sys, time\n"
              "from trainbox.study import open_study\n"
              "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.005)\n"
              "print(open_study(sys.argv[2], 'race', 'minimize')._study_id)\n")
    procs = [subprocess.Popen([sys.executable, "-c", opener, str(go), url], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    time.sleep(3)  # every opener has imported optuna and is polling
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    failed = [err[-1500:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert not failed, failed
    assert len({out.strip() for out, _ in outs}) == 1, "every opener sees the same study"


def test_a_dead_daemons_trial_is_failed_as_lost_and_the_other_daemon_finishes_the_sweep(postgres_url, tmp_path):
    """Daemon B dies (SIGKILL) in the middle of its trial and does not come back for a while: daemon A runs the
    other trials, fails B's trial as lost once its heartbeat is older than lost_after_minutes, and reports.
    When B comes back it finishes its own trial, which the study keeps as failed."""
    sweep = {"lost_after_minutes": 0.1}  # 6 s without a heartbeat
    a, b = (home_for(tmp_path / name, postgres_url, study="lost-trial", **sweep) for name in ("a", "b"))
    daemon_b = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--home", str(b)],
                                stdout=subprocess.DEVNULL, stderr=open(b / "daemon.err", "w"), cwd=REPO)

    def b_training() -> bool:
        return any(j["parent"] and j["state"] == "running" and j["stage"] == "train" for j in jobs_json(b))
    wait_for(b_training, 180, "daemon B running a trial's train stage")
    daemon_b.kill()
    assert daemon_b.wait(timeout=30) == -9

    daemon_a = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(a)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=600)
    assert daemon_a.returncode == 0, daemon_a.stderr[-3000:]
    (sweep_a,) = [j for j in jobs_json(a) if j["parent"] is None]
    assert sweep_a["state"] == "succeeded", sweep_a["error"]
    study = open_study(postgres_url, "lost-trial", "minimize")
    counted = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert len(counted) == TRIALS
    lost = [t for t in counted if t.state.name == "FAIL"]
    assert len(lost) == 1 and "lost: its daemon sent no heartbeat for 6 s" in lost[0].user_attrs["note"]
    assert [t.number for t in counted if t.state.name == "COMPLETE"] == sorted(
        j["trial"]["number"] for j in jobs_json(a) if j["parent"] and j["state"] == "succeeded")
    assert f"trial {lost[0].number} failed as lost" in (a / "logs" / "daemon.log").read_text(encoding="utf-8")

    # B comes back: its trial resumes and ends in B's own records; the study is not changed
    daemon_b = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--once", "--home", str(b)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=600)
    assert daemon_b.returncode == 0, daemon_b.stderr[-3000:]
    (trial_b,) = [j for j in jobs_json(b) if j["parent"]]
    assert trial_b["state"] == "succeeded" and trial_b["trial"]["number"] == lost[0].number
    assert "already ended this trial" in trial_b["trial"]["note"]
    after = open_study(postgres_url, "lost-trial", "minimize").get_trials()
    assert [(t.number, t.state.name) for t in after] == [(t.number, t.state.name) for t in study.get_trials()]
