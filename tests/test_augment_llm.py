"""The llm backend against a real OpenAI-compatible server: llama-cpp-python's server on a GGUF that trainbox's
export code writes from a tiny random Phi-3. Random weights answer junk: this checks the plumbing (requests,
provenance, the cache on a rerun) and that junk is scored low and filtered, not the quality of rewrites.

Also the resume contract: a real SIGKILL of the stage child mid-way, then a rerun that finishes to the same bytes.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import export_fixtures as F
from augment_fixtures import REPO, make_augment_stage, run_augment_child, start_augment
from conftest import wait_for
from handlers.export.llama_cpp_check import available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="llama-cpp-python (extra gguf-runtime) is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of a llama.cpp OpenAI-compatible server on trainbox's own F16 GGUF of a tiny random Phi-3."""
    from handlers import modelio
    from handlers.export.gguf_writer import write_gguf
    from handlers.export.tokenizer_meta import read_tokenizer_meta

    root = tmp_path_factory.mktemp("llm")
    model_dir = F.tiny_real_tokenizer(root / "phi3", "phi3")
    config = json.loads((model_dir / "config.json").read_text())
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], modelio.load_tokenizer(model_dir))
    gguf = write_gguf(model_dir, root / "tiny-f16.gguf", "f16", meta, name="tiny", config=config).path
    port = _free_port()
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "tiny",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: proc.poll() is not None or _answers(url), 120, "llama.cpp server")
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _settings(url: str) -> dict:
    return {"backend": "llm", "multiplier": 2, "min_quality": 0.5, "min_rows": 40,
            "techniques": ["style_transfer", "relationship", "hard_negative"],
            "llm": {"url": url, "model": "tiny", "max_tokens": 24, "concurrency": 2, "timeout_seconds": 30}}


def _journal_records(stage: Path) -> int:
    path = stage / "augmented" / "journal.jsonl"
    return path.read_bytes().count(b"\n") - 1 if path.exists() else 0


def test_llm_backend_killed_resumes_and_a_rerun_is_served_from_the_cache(server: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    stage = make_augment_stage(tmp_path / "first", _settings(server), rows=40, home=home)
    child = start_augment(stage)
    wait_for(lambda: child.poll() is not None or _journal_records(stage) >= 5, 240, "five journal records")
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    done_before = _journal_records(stage)
    assert 5 <= done_before < 40 and not (stage / "augmented" / "train.jsonl").exists()

    assert run_augment_child(stage) == 0, (stage.parent / "augment.log").read_text()[-3000:]
    assert f"resuming augmentation after {done_before} source row(s)" in (stage.parent / "augment.log").read_text()
    resumed = (stage / "augmented" / "train.jsonl").read_bytes()
    rows = [json.loads(line) for line in resumed.decode().splitlines()]
    generated = [r for r in rows if r["kind"] != "original"]
    assert all(r["meta"]["provenance"]["backend"] in ("llm", "embedding") for r in generated)
    assert all(r["meta"]["provenance"]["model"] == "tiny" for r in generated
               if r["meta"]["provenance"]["backend"] == "llm")
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["dropped_low_quality"] > 0  # random weights write junk, and junk scores low
    assert all(r["meta"]["provenance"]["quality"] >= 0.5 for r in generated)
    distinct = len(list((home / "cache" / "augment-llm").rglob("*.json")))
    assert distinct > 0 and stats["llm_cache"]["misses"] <= distinct  # the resumed run asked only what was left

    again = make_augment_stage(tmp_path / "again", _settings(server), rows=40, home=home)
    assert run_augment_child(again) == 0, (again.parent / "augment.log").read_text()[-3000:]
    assert (again / "augmented" / "train.jsonl").read_bytes() == resumed
    cache = json.loads((again / "stats.json").read_text())["llm_cache"]
    assert cache["misses"] == 0 and cache["hits"] >= distinct  # a prompt asked twice is one cache entry
    assert len(list((home / "cache" / "augment-llm").rglob("*.json"))) == distinct
