"""GGUF files tokenize rendered chats in llama.cpp exactly as training does, for real tokenizers (Phi-3,
TinyLlama's Zephyr-style template without bos_token, Mistral v3 SentencePiece) with tiny random weights.

llama.cpp always runs in a child process (handlers.export.llama_cpp_check), never in the test runner.
"""
from __future__ import annotations

import json
import sys

import pytest

import export_fixtures as F
from handlers import modelio
from handlers.export import gguf_writer, llama_cpp_check, verify
from handlers.export.gguf_writer import write_gguf
from handlers.export.tokenizer_meta import read_tokenizer_meta
from handlers.train.data import encode_example
from trainbox.rows import Example

pytestmark = pytest.mark.skipif(not llama_cpp_check.available(),
                                reason="llama-cpp-python (extra gguf-runtime) is not installed")

ENGLISH = ["Hello, who are you?", "Summarise this in one line:\n  the cat sat on the mat.", "List three fruits.",
           "What is 2 + 2?", "Thanks!  Bye.", "Write `print('hi')` in Python.\n\nThen explain it."]
CHINESE = ["你好，请介绍一下你自己。", "把这句话翻译成英文：今天天气很好。", "列出三种水果。", "谢谢！"]
JAPANESE = ["こんにちは。自己紹介をしてください。", "次の文を英語に訳してください：今日は良い天気です。", "果物を三つ挙げてください。",
            "ありがとう！"]
ANSWERS = ["Sure.", "好的，没问题。", "はい、わかりました。", "The answer is 4.\nAnything else?", "Apple, banana, cherry."]


def conversations(n: int = 120) -> list[list[dict[str, str]]]:
    """Multi-turn chats (1 to 3 user turns) mixing English, Chinese and Japanese, some with a system turn."""
    pools = [ENGLISH, CHINESE, JAPANESE]
    out = []
    for i in range(n):
        turns = 1 + i % 3
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
        for t in range(turns):
            pool = pools[(i + t) % 3]
            messages.append({"role": "user", "content": pool[(i * 7 + t) % len(pool)]})
            if t < turns - 1:
                messages.append({"role": "assistant", "content": ANSWERS[(i + t) % len(ANSWERS)]})
        out.append(messages)
    return out


def _supports_system(tokenizer) -> bool:
    return "system" in (tokenizer.chat_template or "")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """which -> (which, model dir, config, tokenizer, meta, F16 GGUF), each built once per module."""
    cache = {}

    def get(which):
        if which not in cache:
            model_dir = F.tiny_real_tokenizer(tmp_path_factory.mktemp(which), which)
            config = json.loads((model_dir / "config.json").read_text())
            tokenizer = modelio.load_tokenizer(model_dir)
            meta = read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
            written = write_gguf(model_dir, model_dir / "m-f16.gguf", "f16", meta, name="tiny-job", config=config)
            cache[which] = which, model_dir, config, tokenizer, meta, written
        return cache[which]
    return get


@pytest.fixture(params=["phi3", "tinyllama", "mistral"])
def real(request, built):
    return built(request.param)


def _chat_probes(tokenizer, meta):
    chats = conversations()
    if not _supports_system(tokenizer):
        chats = [[m for m in c if m["role"] != "system"] for c in chats]
    return [verify.chat_probe(tokenizer, c, meta.add_bos) for c in chats]


def _llama_ids(path, probes):
    out = llama_cpp_check.run_in_child(path, [{"text": p.llama_text, "generate": 0} for p in probes])
    assert "cases" in out, out
    return [c["ids"] for c in out["cases"]]


def test_every_rendered_chat_tokenizes_as_in_training(real):
    name, _dir, _config, tokenizer, meta, written = real
    probes = _chat_probes(tokenizer, meta)
    got = _llama_ids(written.path, probes)
    same = sum(g == p.ids for g, p in zip(got, probes))
    assert same == len(probes) == 120, f"{name}: {same}/{len(probes)} chats tokenize like training"
    assert "llama_cpp" not in sys.modules  # the test runner never loads llama.cpp


def test_phi3_needs_its_name_marker_in_the_gguf(built, tmp_path, monkeypatch):
    """Without "phi3" in general.name llama.cpp keeps the newline after <|user|> etc. as a token of its own."""
    _name, model_dir, config, tokenizer, meta, _written = built("phi3")
    monkeypatch.setattr(gguf_writer, "general_name", lambda n, arch, tokens: n)
    plain = write_gguf(model_dir, tmp_path / "plain.gguf", "f16", meta, name="tiny-job", config=config)
    probes = _chat_probes(tokenizer, meta)
    got = _llama_ids(plain.path, probes)
    assert sum(g == p.ids for g, p in zip(got, probes)) == 0


def test_training_llama_cpp_and_ollama_agree_on_bos(real):
    """TinyLlama's template never writes <s>; training, the GGUF and the Ollama TEMPLATE still start with it once."""
    name, _dir, _config, tokenizer, meta, written = real
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"}]
    trained = encode_example(tokenizer, Example(id="r1", format="chat", messages=messages), 512).input_ids
    assert trained[0] == tokenizer.bos_token_id if name != "phi3" else trained[0] != tokenizer.bos_token_id
    assert trained.count(tokenizer.bos_token_id) == (0 if name == "phi3" else 1)
    probe = verify.chat_probe(tokenizer, messages[:1], meta.add_bos)
    assert _llama_ids(written.path, [probe]) == [probe.ids]
    assert trained[:len(probe.ids) - 1] == probe.ids[:-1]  # the prompt is a prefix of the trained sequence
    assert meta.add_bos == (name == "tinyllama")


def test_the_verifier_reports_a_tokenization_difference(built, tmp_path):
    """A GGUF that adds no BOS where training had one fails verification with the first differing tokens."""
    from dataclasses import replace

    _name, model_dir, config, tokenizer, meta, _written = built("tinyllama")

    wrong = write_gguf(model_dir, tmp_path / "nobos.gguf", "f16", replace(meta, add_bos=False), name="t",
                       config=config)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    probe = verify.chat_probe(tokenizer, [{"role": "user", "content": "Hello"}], gguf_adds_bos=True)
    cpp = verify.compare_with_llama_cpp(wrong.path, ref, tokenizer, [probe], n_tokens=2)
    assert cpp["tokenize_matches"] is False and cpp["tokenize_mismatches"][0]["first_difference_at"] == 0
    numbers = {"top1_agreement": 1.0, "max_abs_diff": 0.0, "tokenizer_agreement": 1.0}
    problems, _warnings = verify.judge("f16", numbers, cpp)
    assert len(problems) == 1 and "tokenizes 1 verify prompt(s) differently from training" in problems[0]


def test_the_ollama_template_renders_the_prompts_llama_cpp_was_checked_with(real):
    """What Ollama builds from the Modelfile TEMPLATE is the text the verifier gave llama.cpp."""
    from handlers.export import ollama

    _name, _dir, _config, tokenizer, meta, _written = real
    t = ollama.translate(lambda m, g: modelio.render_chat(tokenizer, m, add_generation_prompt=g),
                         tokenizer.chat_template, tokenizer.bos_token, meta.add_bos)
    chats = conversations(24)
    if t.system is None:
        chats = [[m for m in c if m["role"] != "system"] for c in chats]
    for chat in chats:
        assert t.render(chat) == verify.chat_probe(tokenizer, chat, meta.add_bos).llama_text
