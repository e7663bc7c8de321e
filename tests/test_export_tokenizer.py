"""Tokenizer metadata round-trips through GGUF: special and added tokens, chat template, real 32k vocab."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import export_fixtures as F
from handlers import modelio
from handlers.export import tokenizer_meta as T
from handlers.export.gguf_writer import write_gguf


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template")
    return {k.rsplit(".", 1)[-1]: value(k) for k in keys}


def _export(model_dir: Path, tokenizer) -> tuple[T.TokenizerMeta, dict]:
    config = json.loads((model_dir / "config.json").read_text())
    meta = T.read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
    written = write_gguf(model_dir, model_dir / "t.gguf", "f16", meta, name="t", config=config)
    return meta, _fields(written.path)


def test_sentencepiece_tokenizer_with_added_tokens_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    model_dir = F.tiny_llama_spm(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta, got = _export(model_dir, tok)
    assert got["model"] == "llama" and got["chat_template"] == F.PHI3_TEMPLATE
    tokens, types = got["tokens"], got["token_type"]
    assert len(tokens) == len(tok)
    for special in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert types[tok.convert_tokens_to_ids(special)] == T.CONTROL
    assert types[tok.convert_tokens_to_ids("<think>")] == T.USER_DEFINED
    assert types[0] == T.UNKNOWN and types[1] == types[2] == T.CONTROL
    assert types[tok.convert_tokens_to_ids("<0x41>")] == T.BYTE
    assert (got["bos_token_id"], got["eos_token_id"], got["unknown_token_id"]) == (1, 2, 0)
    # the real SentencePiece scores (tokenizer.model sits next to tokenizer.json)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert [round(s, 4) for s in got["scores"][: sp.vocab_size()]] == [round(sp.GetScore(i), 4)
                                                                      for i in range(sp.vocab_size())]


def test_scores_derived_from_merges_reproduce_the_merge_order(tmp_path):
    from transformers import AutoTokenizer

    model_dir = F.tiny_llama_spm(tmp_path / "m", added=False)
    (model_dir / "tokenizer.model").unlink()  # as transformers 5 saves it: tokenizer.json only
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta, _got = _export(model_dir, tok)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in tj["model"]["merges"]]
    vocab = tj["model"]["vocab"]
    ranked = [meta.scores[vocab[m]] for m in dict.fromkeys(merged)]
    assert ranked == sorted(ranked, reverse=True)


def test_byte_level_bpe_of_builtin_tiny(tmp_path):
    model_dir = modelio.build_tiny_model(tmp_path / "tiny")
    tok = modelio.load_tokenizer(model_dir)
    meta, got = _export(model_dir, tok)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    assert got["model"] == "gpt2" and got["pre"] == "gpt-2"
    assert len(got["merges"]) == len(tj["model"]["merges"]) and got["scores"] is None
    assert got["tokens"][tok.convert_tokens_to_ids("<|end|>")] == "<|end|>"
    assert got["token_type"][tok.convert_tokens_to_ids("<|end|>")] == T.CONTROL
    assert got["token_type"][tok.convert_tokens_to_ids("<think-task>")] == T.USER_DEFINED
    assert got["eos_token_id"] == tok.eos_token_id and got["padding_token_id"] == tok.pad_token_id
    assert got["add_bos_token"] is False and got["chat_template"] == tok.chat_template


def test_qwen2_pre_tokenizer_is_recognised(tmp_path):
    from transformers import AutoTokenizer

    model_dir = F.tiny_qwen2(tmp_path / "q")
    _meta, got = _export(model_dir, AutoTokenizer.from_pretrained(model_dir))
    assert got["pre"] == "qwen2" and got["chat_template"] == F.CHATML_TEMPLATE


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path):
    from trainbox.errors import StageFailed
    from transformers import AutoTokenizer

    model_dir = F.tiny_qwen2(tmp_path / "q")
    with pytest.raises(StageFailed, match="resize"):
        T.read_tokenizer_meta(model_dir, 10, AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def mistral_export(tmp_path_factory):
    """A tiny Llama with Mistral 7B's real 32k SentencePiece vocabulary (shipped by mistral-common), as GGUF."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaConfig, LlamaForCausalLM

    sp_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    model_dir = tmp_path_factory.mktemp("mistral") / "mistral-shaped"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(sp_file.read_bytes())
    # legacy=True: SentencePiece's own rule, a leading space before every piece of text (prepend_scheme always)
    tok = F.spm_hf_tokenizer(sp_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", legacy=True)
    tok.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    meta, got = _export(model_dir, tok)
    return sp_file, model_dir, got


def test_real_mistral_sentencepiece_vocabulary_survives(mistral_export):
    """Every token, score and type of the real vocabulary is in the GGUF as SentencePiece has it."""
    import gguf
    import sentencepiece as spm

    sp_file, model_dir, got = mistral_export
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    assert sp.vocab_size() == len(got["tokens"]) == 32000
    want_types = [T._sp_type(sp, i) for i in range(32000)]
    assert got["tokens"] == [sp.IdToPiece(i) for i in range(32000)]
    assert got["token_type"] == want_types
    assert [float(s) for s in got["scores"]] == [float(sp.GetScore(i)) for i in range(32000)]
    assert want_types.count(T.BYTE) == 256 and want_types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert (got["bos_token_id"], got["eos_token_id"], got["unknown_token_id"]) == (1, 2, 0)
    assert gguf.GGUFReader(model_dir / "t.gguf").fields["tokenizer.ggml.scores"].types[-1] == gguf.GGUFValueType.FLOAT32


def test_llama_cpp_tokenizes_the_real_vocabulary_like_sentencepiece(mistral_export):
    from handlers.export import llama_cpp_check

    if not llama_cpp_check.available():  # found without importing it: llama.cpp never runs in the test runner
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    import sentencepiece as spm

    sp_file, model_dir, _got = mistral_export
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    texts = ["Hello world", " leading space", "multiple   spaces\n\nnew lines\ttabs", "résumé naïve 東京 🚀",
             "def f(x):\n    return x**2  # comment", "numbers 1234567 3.14159 and ALL CAPS"]
    out = llama_cpp_check.run_in_child(model_dir / "t.gguf", [
        {"text": t, "generate": 0, "add_special": False, "parse_special": False} for t in texts])
    for text, case in zip(texts, out["cases"]):
        assert case["ids"] == sp.encode(text), text
