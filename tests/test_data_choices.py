"""Data that public datasets really contain is trained as it says or reported, never silently changed:
per-turn ``loss_weight``, ShareGPT ``tools`` with function_call / observation turns, leftover ``{{name}}``.

Rows come from real LLaMA-Factory demo files (tests/fixtures/llamafactory, Apache-2.0) read through the real
ingest parser, encoded with the tokenizer of the builtin tiny model and with chat templates written here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO, drop, read_store, wait_for
from handlers import modelio
from handlers.train import rendering
from handlers.train.data import IGNORE, encode_example
from trainbox.errors import InvalidInput
from trainbox.rows import read_examples

LF = FIXTURES / "llamafactory"
# a template with native tool support, in the style of Qwen2.5 / Llama 3.1 (schemas, calls, tool role)
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>\n"
    "{% endif %}{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}{% else %}{{ m.content }}"
    "{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Phi-3 style: only system, user and assistant turns are written; anything else vanishes
NO_TOOL_ROLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}<|{{ m.role }}|>\n"
    "{{ m.content }}<|end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return modelio.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def tokenizer_with(tiny, template: str | None):
    tok = modelio.load_tokenizer(tiny)
    if template is not None:
        tok.chat_template = template
    return tok


def learned_text(tok, enc) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE])


def rows(tmp_path, *lines: dict) -> list:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return read_examples(path)[1]


# loss_weight -------------------------------------------------------------------------------------------
def test_loss_weight_zero_masks_an_assistant_turn_and_one_learns_it(tiny, tmp_path):
    tok = tokenizer_with(tiny, None)
    turn = lambda role, text, w: {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": w}
    (ex,) = rows(tmp_path, {"messages": [turn("user", "hi", 0.0), turn("assistant", "Hello there.", 0.0),
                                         turn("user", "who are you?", 0.0), turn("assistant", "A bot.", 1.0)]})
    enc = encode_example(tok, ex, 256)
    assert "Hello there." in tok.decode(enc.input_ids)  # still in the context the model sees
    assert learned_text(tok, enc) == "A bot.<|end|>"
    unweighted = encode_example(tok, rows(tmp_path, {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "A bot."}]})[0], 256)
    assert unweighted.input_ids == enc.input_ids
    assert learned_text(tok, unweighted) == "Hello there.<|end|>A bot.<|end|>"


def test_the_v1_sft_demo_rows_learn_exactly_their_weighted_turns(tiny):
    tok = tokenizer_with(tiny, None)
    info, examples = read_examples(LF / "v1_sft_demo.head.jsonl")
    assert info.format == "messages" and info.rows == 3
    raw = [json.loads(line) for line in (LF / "v1_sft_demo.head.jsonl").read_text().splitlines()]
    for ex, row in zip(examples, raw):
        want = "".join(m["content"][0]["value"] + "<|end|>" for m in row["messages"] if m["loss_weight"] == 1.0)
        assert learned_text(tok, encode_example(tok, ex, 256)) == want


@pytest.mark.parametrize("turn, says", [
    ({"role": "assistant", "content": "x", "loss_weight": 0.5}, "partial weights are not supported"),
    ({"role": "assistant", "content": "x", "loss_weight": "0"}, "masks a turn (0) or learns it (1)"),
    ({"role": "user", "content": "x", "loss_weight": 1}, "only assistant turns are learned"),
])
def test_a_loss_weight_trainbox_cannot_honour_is_rejected_with_its_line(tmp_path, turn, says):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    with pytest.raises(InvalidInput) as err:
        rows(tmp_path, good, bad)
    assert err.value.problems[0].line == 2 and says in err.value.problems[0].message


# tools ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tools, says", [
    ("{not json", "'tools' is a string but not usable JSON (Expecting property name"),
    ("[" * 5000 + "]" * 5000, "'tools' is a string but not usable JSON (maximum recursion depth"),
    ('[{"a": ' + "9" * 5000 + "}]", "'tools' is a string but not usable JSON (Exceeds the limit"),
    ([1], "'tools' must be a list of function schemas"),
])
def test_unusable_tools_are_rejected_at_ingest_with_their_line(tmp_path, tools, says):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": tools}
    with pytest.raises(InvalidInput) as err:
        rows(tmp_path, {"conversations": row["conversations"]}, row)
    assert err.value.problems[0].line == 2 and err.value.problems[0].message.startswith(says)


def _glaive():
    info, examples = read_examples(LF / "glaive_toolcall_en_demo.head.jsonl")
    assert info.format == "sharegpt"
    raw = [json.loads(line) for line in (LF / "glaive_toolcall_en_demo.head.jsonl").read_text().splitlines()]
    return examples, raw


@pytest.mark.parametrize("template", [None, NO_TOOL_ROLE_TEMPLATE], ids=["default-format", "no-tool-role"])
def test_without_tool_support_every_turn_and_schema_is_kept_as_text_and_the_split_is_warned(tiny, template):
    tok = tokenizer_with(tiny, template)
    examples, raw = _glaive()
    for ex, row in zip(examples, raw):
        enc = encode_example(tok, ex, 4096)
        text = tok.decode(enc.input_ids)
        for turn in row["conversations"]:
            assert turn["value"] in text, f"{turn['from']} turn lost"
        for schema in json.loads(row["tools"]):
            assert schema["name"] in text and schema["description"] in text
        learned = learned_text(tok, enc)
        calls = [t["value"] for t in row["conversations"] if t["from"] == "function_call"]
        assert all(c in learned for c in calls)  # the model learns to emit the call
        assert not any(t["value"] in learned for t in row["conversations"] if t["from"] == "observation")
    warning = rendering.tool_warning(tok, examples, "train split")
    assert warning is not None and warning.startswith("train split: 2 rows defining tools, 4 tool calls, "
                                                      "4 tool results; the chat template does not render tool "
                                                      "schemas, tool calls")
    assert ("the tool role" in warning) == (template is not None)


def test_a_template_with_tool_support_renders_schemas_calls_and_results_natively(tiny):
    tok = tokenizer_with(tiny, TOOL_TEMPLATE)
    assert rendering.tool_support(tok).complete
    examples, raw = _glaive()
    enc = encode_example(tok, examples[0], 4096)
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|bos|><|system|>\nTools: search_recipes<|end|>")
    call = json.loads(raw[0]["conversations"][3]["value"])
    native = f"<call>search_recipes {json.dumps(call['arguments'])}</call>"
    assert native in text and "<|tool|>\n" + raw[0]["conversations"][4]["value"] in text
    assert native in learned_text(tok, enc)
    assert rendering.tool_warning(tok, examples, "train split") is None


# placeholders --------------------------------------------------------------------------------------------
def test_leftover_placeholders_are_reported_by_prepare_and_reach_show_and_events(home, daemon_factory):
    drop(home / "inbox", "identity.jsonl", (LF / "identity.head.jsonl").read_bytes())
    daemon = daemon_factory().wait_ready()
    job = wait_for(lambda: next((j for j in read_store(home).all_jobs() if j.state == "succeeded"), None), 120,
                   "prepare job done")
    daemon.stop()
    shown = subprocess.run([sys.executable, "-m", "daemon.cli", "show", job.id, "--json", "--home", str(home)],
                           capture_output=True, text=True, check=True, cwd=REPO)
    prepare = json.loads(shown.stdout)["job"]["stages"][0]
    want = ("identity.jsonl: 4 row(s) contain template placeholders ({{name}}, {{author}}) that would be trained "
            "literally; first at line 1: ")
    assert want in prepare["message"]
    assert prepare["summary"]["data_warnings"][0].startswith(want)
    events = [e for e in read_store(home).recent_events(50) if e["kind"] == "data_warning"]
    assert len(events) == 1 and events[0]["job_id"] == job.id and events[0]["message"].startswith(want)
    assert want in (home / "jobs" / job.id / "prepare" / "stage.log").read_text()


@pytest.mark.slow
def test_the_train_stage_puts_the_tool_warning_in_its_result_and_events(tmp_path):
    from train_fixtures import make_train_stage, run_stage

    examples, _raw = _glaive()
    stage = make_train_stage(tmp_path, {"train": examples, "val": [], "test": []},
                             {"max_steps": 2, "batch_size": 2, "max_seq_length": 256})
    assert run_stage(stage) == 0, (tmp_path / "job" / "child.log").read_text()
    result = json.loads((stage / "result.json").read_text())
    (warning,) = result["summary"]["data_warnings"]
    assert warning.startswith("train split: 2 rows defining tools, 4 tool calls, 4 tool results")
    assert warning in result["message"]
    events = [json.loads(line) for line in (stage / "events.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["kind"] == "data_warning"] == [warning]
