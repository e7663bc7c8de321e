"""Ingest in-process with a real store and real files: every input ends accepted or rejected with a reason."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.config import DaemonSettings
from daemon.ingest import Ingestor, resolve_datasets
from daemon.layout import Layout
from daemon.status import rejected_files
from daemon.store import Store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = {"messages.jsonl": "messages", "sharegpt.jsonl": "sharegpt", "alpaca.jsonl": "alpaca",
           "prompt_completion.jsonl": "prompt_completion", "text.jsonl": "text",
           "safety_think.jsonl": "classification", "preference.jsonl": "preference", "kto.jsonl": "kto"}


class Sent(list):
    def __call__(self, event: str, title: str, message: str, **data: object) -> None:
        self.append((event, title, message))


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    layout = Layout(tmp_path / "home")
    layout.create()
    settings = DaemonSettings.model_validate({"default_job": {"delay_seconds": 0}})
    return Ingestor(layout, Store.for_home(layout.home), settings, gpu_count=0, notify=Sent())


def put(ing: Ingestor, name: str, content: bytes | str) -> Path:
    path = ing.layout.inbox / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    ing.ingest(path)
    return path


def only_rejection(ing: Ingestor) -> str:
    (entry,) = rejected_files(ing.layout)
    assert Path(entry["path"]).exists(), "the rejected file itself is kept"
    return Path(entry["error_file"]).read_text(encoding="utf-8")


@pytest.mark.parametrize("name,fmt", sorted(FORMATS.items()))
def test_every_format_is_accepted(ingestor: Ingestor, name: str, fmt: str) -> None:
    put(ingestor, name, (FIXTURES / name).read_bytes())
    (ds,) = ingestor.store.all_datasets()
    assert (ds["name"], ds["format"], ds["rows"]) == (name, fmt, 12)
    assert (ingestor.layout.home / ds["path"]).read_bytes() == (FIXTURES / name).read_bytes()
    assert not list(ingestor.layout.inbox.iterdir()) and not list(ingestor.layout.ingesting.iterdir())


def test_bom_crlf_and_blank_lines_are_fine(ingestor: Ingestor) -> None:
    body = (FIXTURES / "alpaca.jsonl").read_text(encoding="utf-8").replace("\n", "\r\n\r\n")
    put(ingestor, "win.jsonl", b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert ingestor.store.all_datasets()[0]["rows"] == 12


def test_classification_keeps_labels_and_metadata(ingestor: Ingestor) -> None:
    put(ingestor, "s.jsonl", (FIXTURES / "safety_think.jsonl").read_bytes())
    ds = ingestor.store.all_datasets()[0]
    assert ds["labels"] == {"ALLOW": 3, "ESCALATION": 3, "DENY": 3, "REFUSE": 3}


@pytest.mark.parametrize("content,expect", [
    (b"", "empty dataset"),
    (b"\n\n  \n", "empty dataset"),
    (b"\x00\x01\x02garbage\xff" * 50, "binary"),
    (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    (b'{"text": "a"}\n{"text": \n', ":2:"),
    (b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "mixed formats"),
    (b'{"foo": 1}\n', "match no known format"),
    (b'[1, 2]\n', "must be a JSON object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    (b'{"text": "x", "label": "A", "think": {"mood": "x"}}\n', "unknown keys"),
])
def test_bad_datasets_are_rejected_with_line_and_fix(ingestor: Ingestor, content: bytes, expect: str) -> None:
    put(ingestor, "bad.jsonl", content)
    assert not ingestor.store.all_datasets()
    text = only_rejection(ingestor)
    assert "bad.jsonl" in text and expect in text
    assert (ingestor.layout.rejected / "bad.jsonl").read_bytes() == content


def test_only_first_twenty_bad_lines_are_listed(ingestor: Ingestor) -> None:
    put(ingestor, "many.jsonl", "not json\n" * 100)
    text = only_rejection(ingestor)
    assert "100 bad line(s) (first 20 shown)" in text
    assert "many.jsonl:20:" in text and "many.jsonl:21:" not in text


def test_five_megabyte_line(ingestor: Ingestor) -> None:
    big = "x" * 5_000_000
    put(ingestor, "big.jsonl", json.dumps({"text": big}) + "\n")
    assert ingestor.store.all_datasets()[0]["bytes"] > 5_000_000
    put(ingestor, "bigbad.jsonl", '{"text": "' + big + "\n")  # unterminated: rejected, error stays short
    text = only_rejection(ingestor)
    assert len(text) < 2000 and "bigbad.jsonl:1:" in text


def test_unsupported_extension(ingestor: Ingestor) -> None:
    put(ingestor, "notes.csv", "a,b\n")
    assert "drop datasets as .jsonl" in only_rejection(ingestor)


def test_same_content_twice_is_recognised(ingestor: Ingestor) -> None:
    data = (FIXTURES / "text.jsonl").read_bytes()
    put(ingestor, "one.jsonl", data)
    put(ingestor, "two.jsonl", data)
    assert len(ingestor.store.all_datasets()) == 1
    assert "already ingested as 'one.jsonl'" in only_rejection(ingestor)


def test_job_waits_for_its_dataset_then_queues(ingestor: Ingestor) -> None:
    put(ingestor, "job.yaml", "name: later\ndatasets: [later_data.jsonl]\nstages: [prepare]\n")
    (job,) = ingestor.store.all_jobs()
    assert job.state == "waiting"
    assert (ingestor.layout.job_dir(job.id) / "job.yaml").exists()
    put(ingestor, "later_data.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    ingestor.create_due_default_jobs()
    jobs = ingestor.store.all_jobs()
    assert len(jobs) == 1, "the dataset's default job is not created when a job claims it"
    assert jobs[0].state == "queued" and len(jobs[0].datasets) == 1


def test_dataset_alone_gets_the_default_job(ingestor: Ingestor) -> None:
    put(ingestor, "solo data.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    ingestor.create_due_default_jobs()
    (job,) = ingestor.store.all_jobs()
    assert job.name == "solo-data" and job.state == "queued"
    assert job.source == "default_job for solo data.jsonl"


def test_invalid_job_is_rejected_with_location(ingestor: Ingestor) -> None:
    put(ingestor, "job.yml", "name: x\ndatasets: [d]\ntrain:\n  epocs: 2\n")
    text = only_rejection(ingestor)
    assert "job.yml:4:3: train.epocs: is not a field" in text and "did you mean train.epochs?" in text
    assert not ingestor.store.all_jobs()


def test_qlora_without_cuda_is_rejected_at_ingest(ingestor: Ingestor) -> None:
    put(ingestor, "q.yaml", "name: q\ndatasets: [d]\ntrain:\n  method: qlora\n")
    text = only_rejection(ingestor)
    assert "q.yaml:4:3: train.method: qlora needs an NVIDIA GPU with CUDA" in text
    assert "set train.method: lora" in text


def test_unsupported_export_architecture_is_rejected_at_ingest(ingestor: Ingestor, tmp_path: Path) -> None:
    model = tmp_path / "gpt2-folder"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    put(ingestor, "g.yaml", f"name: g\ndatasets: [d]\nbase_model: {model}\n")
    text = only_rejection(ingestor)
    assert "GGUF export does not support GPT2LMHeadModel" in text and "Phi3ForCausalLM" in text


def test_loss_weights_are_accepted_and_a_negative_weight_is_rejected(ingestor: Ingestor) -> None:
    put(ingestor, "w.yaml", "name: w\ndatasets: [d]\ntrain:\n  loss_weights: {style: 0.5, contrastive: 0.2}\n")
    jobs = ingestor.store.all_jobs()
    assert [j.name for j in jobs] == ["w"]
    put(ingestor, "neg.yaml", "name: neg\ndatasets: [d]\ntrain:\n  loss_weights: {style: -1}\n")
    assert "train.loss_weights.style" in only_rejection(ingestor)


def test_augment_stage_is_accepted_and_its_multiplier_checked(ingestor: Ingestor) -> None:
    put(ingestor, "big.yaml", "name: big\ndatasets: [d]\nstages: [prepare, augment, train]\naugment:\n  multiplier: 30\n")
    assert "augment.multiplier: must be `auto` or a number from 1 to 20" in only_rejection(ingestor)
    put(ingestor, "a.yaml", "name: a\ndatasets: [d]\nstages: [prepare, augment, train]\naugment: {multiplier: 2.5}\n")
    assert [j.name for j in ingestor.store.all_jobs()] == ["a"]


def test_same_name_rejected_twice_keeps_both(ingestor: Ingestor) -> None:
    put(ingestor, "x.jsonl", b"nope\n")
    put(ingestor, "x.jsonl", b"still nope\n")
    assert len(rejected_files(ingestor.layout)) == 2


def test_recover_finishes_a_claim_recorded_before_a_crash(ingestor: Ingestor) -> None:
    # a claim whose store record exists but whose final move did not happen
    claim = ingestor.layout.ingesting / "20260101000000-abcd1234__d.jsonl"
    claim.write_bytes((FIXTURES / "text.jsonl").read_bytes())
    ingestor.process_claim(claim)
    (ds,) = ingestor.store.all_datasets()
    stored = ingestor.layout.home / ds["path"]
    stored.replace(claim)  # put the state back to "recorded, not moved"
    ingestor.recover()
    assert stored.exists() and not claim.exists()
    assert len(ingestor.store.all_datasets()) == 1 and not rejected_files(ingestor.layout)


def test_resolve_datasets_by_name_stem_glob_and_hash() -> None:
    ds = [{"name": "a.jsonl", "sha256": "1" * 64}, {"name": "b_1.jsonl", "sha256": "2" * 64},
          {"name": "b_2.jsonl", "sha256": "3" * 64}, {"name": "a.jsonl", "sha256": "4" * 64}]
    assert resolve_datasets(["a"], ds) == ["4" * 64]  # newest of that name
    assert sorted(resolve_datasets(["b_*.jsonl"], ds)) == ["2" * 64, "3" * 64]
    assert resolve_datasets(["11111111"], ds) == ["1" * 64]
    assert resolve_datasets(["a", "missing"], ds) is None


def test_a_file_that_cannot_be_claimed_yet_stays_and_is_retried(ingestor: Ingestor, monkeypatch) -> None:
    locked = ingestor.layout.inbox / "busy.jsonl"
    locked.write_bytes((FIXTURES / "text.jsonl").read_bytes())
    real_replace = os.replace

    def windows_like_replace(src, dst):  # what Windows says while a writer still has the file open
        raise PermissionError(13, "The process cannot access the file because it is being used", str(src))
    monkeypatch.setattr(os, "replace", windows_like_replace)
    ingestor.ingest(locked)
    assert locked.exists() and not ingestor.store.all_datasets() and not rejected_files(ingestor.layout)
    monkeypatch.setattr(os, "replace", real_replace)
    ingestor.ingest(locked)  # the next rescan offers it again
    assert not locked.exists() and len(ingestor.store.all_datasets()) == 1


def test_an_unexpected_error_sets_the_file_aside_and_ingest_goes_on(ingestor: Ingestor, monkeypatch) -> None:
    import daemon.datasetcheck as check_module

    def broken_reader(path, name=None, data=None):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(check_module, "read_examples", broken_reader)
    put(ingestor, "boom.jsonl", (FIXTURES / "text.jsonl").read_bytes())
    text = only_rejection(ingestor)
    assert "trainbox failed while reading this file" in text and "simulated bug" in text
    assert not list(ingestor.layout.ingesting.iterdir())
