"""Build a train stage directory without the daemon: prepare's splits plus a stage.json, as the daemon writes them."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainbox.rows import Example, classification_target, read_examples

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "configs" / "demo" / "demo_safety.jsonl"


def demo_examples() -> list[Example]:
    return read_examples(DEMO_DATA)[1]


REGISTERS = {"style_transfer": "Formally: ", "scenario": "At the office: ", "relationship": "Dear manager, "}


def all_kinds_examples(n: int = 120) -> list[Example]:
    """Originals and, from them, rows of every kind the augment stage writes: rewritten prompts tagged
    style_transfer / scenario / relationship (same answer), and hard-negative pairs whose rejected side is
    another label's answer. Built here so train tests do not depend on the augment stage."""
    originals = demo_examples()[:n]
    labels = sorted({ex.label for ex in originals})
    out = list(originals)
    for i, ex in enumerate(originals):
        kind = list(REGISTERS)[i % 3]
        user = {"role": "user", "content": REGISTERS[kind] + ex.text}
        answer = {"role": "assistant", "content": classification_target(ex.label, ex.think)}
        out.append(Example(id=f"{kind[:4]}{ex.id[4:]}", format="messages", messages=[user, answer], kind=kind,
                           source_id=ex.id))
        if i % 2 == 0:
            wrong = labels[(labels.index(ex.label) + 1) % len(labels)]
            out.append(Example(id=f"hneg{ex.id[4:]}", format="messages", kind="hard_negative", source_id=ex.id,
                               messages=[{"role": "user", "content": ex.text}],
                               chosen=classification_target(ex.label, ex.think),
                               rejected=classification_target(wrong, ex.think)))
    return out


def split_by_hash(examples: list[Example], val: float = 0.1, test: float = 0.15) -> dict[str, list[Example]]:
    """Stable split by content hash (what prepare does), so tests do not depend on the prepare stage."""
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for ex in examples:
        x = int(hashlib.sha256(ex.id.encode()).hexdigest()[:8], 16) / 2**32
        out["test" if x < test else "val" if x < test + val else "train"].append(ex)
    return out


def make_train_stage(root: Path, splits: dict[str, list[Example]], train: dict[str, Any] | None = None,
                     settings: dict[str, Any] | None = None, seed: int = 42, base_model: str = "builtin:tiny",
                     home: Path | None = None) -> Path:
    """``root/home`` (shared model cache), ``root/job/prepare`` with splits, ``root/job/train/stage.json``."""
    home = home or root / "home"
    prepare, stage = root / "job" / "prepare", root / "job" / "train"
    (prepare / "splits").mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for name, rows in splits.items():
        (prepare / "splits" / f"{name}.jsonl").write_text("".join(ex.to_json() + "\n" for ex in rows),
                                                         encoding="utf-8")
        artifacts[name] = f"splits/{name}.jsonl"
    job = {"name": "t", "datasets": ["d.jsonl"], "base_model": base_model, "seed": seed,
           "stages": ["prepare", "train"], "train": train or {}}
    spec = {"job_id": "job-1", "stage": "train", "home": str(home), "job": job, "datasets": [],
            "stage_dirs": {"prepare": str(prepare), "train": str(stage)},
            "results": {"prepare": {"state": "succeeded", "artifacts": artifacts, "summary": {}}},
            "device": "cpu", "settings": settings or {}}
    (stage / "stage.json").write_text(json.dumps(spec), encoding="utf-8")
    return stage


def start_stage(stage_dir: Path, log_name: str = "child.log") -> subprocess.Popen:
    """``python -m handlers train DIR`` as a real child process (its log goes next to the stage dir)."""
    log = open(stage_dir.parent / log_name, "ab")
    return subprocess.Popen([sys.executable, "-m", "handlers", "train", str(stage_dir)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_stage(stage_dir: Path, timeout: float = 240) -> int:
    return start_stage(stage_dir).wait(timeout=timeout)


def uninterrupted_run(root: Path, splits: dict[str, list[Example]], train: dict[str, Any],
                      **stage_kwargs: Any) -> Path:
    """A train stage run to the end in a child: the numbers an interrupted run must reproduce."""
    stage = make_train_stage(root, splits, train, **stage_kwargs)
    assert run_stage(stage) == 0, (root / "job" / "child.log").read_text()
    return stage


def metric_rows(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / "metrics" / "training_metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now
    return rows


def wait_for_step(proc: subprocess.Popen, stage_dir: Path, step: int, timeout: float = 180) -> int:
    """Poll the metrics file until it shows ``step``; returns the step seen (the child keeps running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metric_rows(stage_dir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before step {step}; see {stage_dir.parent}")
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def adapter_tensors(stage_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "adapter" / "adapter_model.safetensors"))
