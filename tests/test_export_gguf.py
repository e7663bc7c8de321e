"""GGUF files for tiny Llama / Qwen2 / Phi3 models: read back, loaded by transformers, same top-1 as HF."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import export_fixtures as F
from handlers import modelio
from handlers.export import llama_cpp_check, verify
from handlers.export.gguf_writer import write_gguf
from handlers.export.tokenizer_meta import read_tokenizer_meta

BUILDERS = {"llama": F.tiny_llama_spm, "qwen2": F.tiny_qwen2, "phi3": F.tiny_phi3,
            "phi3_longrope": lambda d: F.tiny_phi3(d, longrope=True), "builtin_tiny": modelio.build_tiny_model}
PROMPTS = ["Hello world", "The quick brown fox", "How do I reset my password?"]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def exported(request, tmp_path_factory):
    """One tiny model per architecture, exported to F16 and Q8_0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
    files = {t: write_gguf(model_dir, model_dir / f"m-{t}.gguf", t, meta, name="tiny", config=config)
             for t in ("f16", "q8_0")}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return request.param, model_dir, config, tokenizer, meta, files, ref


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_gguf_reads_back_and_matches_transformers(exported, out_type):
    name, model_dir, config, tokenizer, meta, files, ref = exported
    written = files[out_type]
    arch = {"qwen2": "qwen2", "phi3": "phi3", "phi3_longrope": "phi3"}.get(name, "llama")
    assert verify.read_back(written.path, written.tensors, arch, config["vocab_size"]) == []
    override = name == "phi3_longrope"  # transformers' GGUF loader has no longrope config keys
    numbers = verify.compare_with_transformers(model_dir, written.path.name, ref, tokenizer, PROMPTS, override)
    assert numbers["top1_agreement"] == 1.0
    assert numbers["max_abs_diff"] < (1e-2 if out_type == "f16" else 0.2)
    assert verify.judge(out_type, numbers)[0] == []


def test_tensor_types_follow_llama_cpp_rules(exported):
    _name, _dir, config, _tok, _meta, files, _ref = exported
    types = {n: q for n, _shape, q in files["q8_0"].tensors}
    assert all(q == "F32" for n, q in types.items() if n.endswith(("_norm.weight", ".bias")))
    assert types["token_embd.weight"] == "Q8_0"
    assert ("output.weight" in types) is not bool(config.get("tie_word_embeddings"))
    assert files["q8_0"].size_bytes < 0.6 * files["f16"].size_bytes


def test_phi3_fused_projections_and_longrope_factors(tmp_path):
    import gguf

    model_dir = F.tiny_phi3(tmp_path / "phi3", longrope=True)
    config = json.loads((model_dir / "config.json").read_text())
    from transformers import AutoTokenizer

    meta = read_tokenizer_meta(model_dir, config["vocab_size"], AutoTokenizer.from_pretrained(model_dir))
    written = write_gguf(model_dir, tmp_path / "p.gguf", "f16", meta, name="p", config=config)
    reader = gguf.GGUFReader(written.path)
    tensors = {t.name: t for t in reader.tensors}
    hidden, ff = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = hidden + 2 * config["num_key_value_heads"] * head_dim
    assert tuple(reversed(tensors["blk.0.attn_qkv.weight"].shape.tolist())) == (qkv, hidden)
    assert tuple(reversed(tensors["blk.0.ffn_up.weight"].shape.tolist())) == (2 * ff, hidden)
    rope = config["rope_parameters"]
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(rope["long_factor"]))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(rope["short_factor"]))
    field = reader.fields["phi3.rope.scaling.attn_factor"]
    scale = 2048 / 256
    assert math.isclose(float(field.parts[field.data[0]][0]), math.sqrt(1 + math.log(scale) / math.log(256)),
                        rel_tol=1e-6)
    field = reader.fields["phi3.rope.scaling.original_context_length"]
    assert int(field.parts[field.data[0]][0]) == 256


@pytest.mark.parametrize("out_type", ["bf16", "q4_0"])
def test_other_output_types_on_builtin_tiny(tmp_path, out_type):
    from transformers import AutoModelForCausalLM

    model_dir = modelio.build_tiny_model(tmp_path / "tiny")
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = modelio.load_tokenizer(model_dir)
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
    written = write_gguf(model_dir, model_dir / f"m-{out_type}.gguf", out_type, meta, name="t", config=config)
    types = {n: q for n, _s, q in written.tensors}
    assert types["blk.0.attn_q.weight"] == out_type.upper()
    if out_type == "q4_0":
        assert types["output.weight"] == "Q8_0"  # the output projection keeps more precision
    assert verify.read_back(written.path, written.tensors, "llama", config["vocab_size"]) == []
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    numbers = verify.compare_with_transformers(model_dir, written.path.name, ref, tokenizer, PROMPTS, False)
    assert verify.judge(out_type, numbers)[0] == []
    assert numbers["max_abs_diff"] < (0.1 if out_type == "bf16" else 3.0)


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_llama_cpp_generates_the_same_greedy_tokens(exported, out_type):
    if not llama_cpp_check.available():  # found without importing it: llama.cpp never runs in the test runner
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _name, _dir, _config, tokenizer, _meta, files, ref = exported
    numbers = verify.compare_with_llama_cpp(files[out_type].path, ref, tokenizer, PROMPTS, n_tokens=8)
    assert numbers["tokenize_matches"]
    # one flipped near-tie makes a greedy continuation diverge, so quantized files need not agree everywhere
    assert numbers["greedy_token_agreement"] >= (1.0 if out_type == "f16" else 0.5)


def test_sharded_bfloat16_checkpoint_streams_into_the_same_gguf(tmp_path):
    """A bf16 checkpoint in several shards gives the same F16 tensors as the one-file float32 original."""
    import gguf
    from transformers import AutoModelForCausalLM

    one = modelio.build_tiny_model(tmp_path / "one")
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(one, dtype=torch.bfloat16)
    model.save_pretrained(sharded, max_shard_size="100KB")
    modelio.load_tokenizer(one).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    config = json.loads((sharded / "config.json").read_text())
    meta = read_tokenizer_meta(sharded, config["vocab_size"], modelio.load_tokenizer(sharded))
    a = write_gguf(sharded, tmp_path / "a.gguf", "f16", meta, name="t", config=config)
    b = write_gguf(one, tmp_path / "b.gguf", "f16", meta, name="t", config=config)
    ta = {t.name: t for t in gguf.GGUFReader(a.path).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b.path).tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in tb.items():  # bf16 rounding first, then f16: within bf16 precision of the original
        np.testing.assert_allclose(ta[name].data.astype(np.float32), t.data.astype(np.float32), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("builder", ["llama", "builtin_tiny"])
def test_bulk_metadata_packing_writes_the_stock_writers_bytes(tmp_path, monkeypatch, builder):
    import gguf
    from transformers import AutoTokenizer

    from handlers.export import gguf_writer

    model_dir = BUILDERS[builder](tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], AutoTokenizer.from_pretrained(model_dir))
    fast = write_gguf(model_dir, tmp_path / "fast.gguf", "q8_0", meta, name="t", config=config)
    monkeypatch.setattr(gguf_writer, "_new_writer", lambda arch: gguf.GGUFWriter(path=None, arch=arch))
    stock = write_gguf(model_dir, tmp_path / "stock.gguf", "q8_0", meta, name="t", config=config)
    assert fast.path.read_bytes() == stock.path.read_bytes()
