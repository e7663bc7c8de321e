"""The verifier catches damaged GGUF files, and llama.cpp (when installed) agrees with transformers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from handlers import modelio
from handlers.export import llama_cpp_check, verify
from handlers.export.gguf_writer import write_gguf
from handlers.export.tokenizer_meta import read_tokenizer_meta

PROMPTS = ["Hello world", "The quick brown fox", "How do I reset my password?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model_dir = modelio.build_tiny_model(tmp_path_factory.mktemp("tiny"))
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = modelio.load_tokenizer(model_dir)
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
    written = write_gguf(model_dir, model_dir / "good.gguf", "f16", meta, name="t", config=config)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, config, tokenizer, written, ref


def _copy(tiny, name):
    model_dir, _c, _t, written, _r = tiny
    target = model_dir / name
    shutil.copy(written.path, target)
    return target


def _data_offset(path, tensor_name):
    import gguf

    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == tensor_name)
    return int(t.data_offset), int(t.n_bytes)


@pytest.mark.parametrize("damage", ["truncated_half", "truncated_tail", "bad_magic", "bad_kv_type"])
def test_damaged_files_are_reported(tiny, damage):
    _d, config, _t, written, _r = tiny
    path = _copy(tiny, f"{damage}.gguf")
    data = path.read_bytes()
    data = {"truncated_half": data[: len(data) // 2], "truncated_tail": data[:-64],
            "bad_magic": b"GGUX" + data[4:], "bad_kv_type": data[:40] + b"\xff" * 64 + data[104:]}[damage]
    path.write_bytes(data)
    problems = verify.read_back(path, written.tensors, "llama", config["vocab_size"])
    assert problems and "truncated or corrupt" in problems[0]


def test_nan_weights_are_reported(tiny):
    _d, config, _t, written, _r = tiny
    path = _copy(tiny, "nan.gguf")
    offset, n = _data_offset(path, "blk.0.attn_v.weight")
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.full(n // 2, np.nan, np.float16).tobytes())
    assert verify.read_back(path, written.tensors, "llama", config["vocab_size"]) == [
        "tensor blk.0.attn_v.weight holds NaN or infinite values"]


def test_wrong_weights_fail_the_logit_check(tiny):
    model_dir, config, tokenizer, written, ref = tiny
    path = _copy(tiny, "scrambled.gguf")
    offset, n = _data_offset(path, "output.weight")
    rng = np.random.default_rng(0)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(rng.normal(0, 1, n // 2).astype(np.float16).tobytes())
    assert verify.read_back(path, written.tensors, "llama", config["vocab_size"]) == []  # still well-formed
    numbers = verify.compare_with_transformers(model_dir, path.name, ref, tokenizer, PROMPTS, False)
    problems, _warnings = verify.judge("f16", numbers)
    assert numbers["top1_agreement"] < 1.0 and problems and "top-1 agreement" in problems[0]


def test_a_different_plan_is_reported(tiny):
    _d, config, _t, written, _r = tiny
    plan = [(n, s, "Q8_0" if n == "blk.0.attn_q.weight" else q) for n, s, q in written.tensors]
    assert verify.read_back(written.path, plan, "llama", config["vocab_size"]) == [
        f"tensor blk.0.attn_q.weight: F16 {dict((n, s) for n, s, _q in plan)['blk.0.attn_q.weight']}, "
        f"expected Q8_0 {dict((n, s) for n, s, _q in plan)['blk.0.attn_q.weight']}"]
    assert "not 'qwen2'" in verify.read_back(written.path, written.tensors, "qwen2", config["vocab_size"])[0]


def test_llama_cpp_greedy_tokens_match_transformers(tiny):
    if not llama_cpp_check.available():  # found without importing it: llama.cpp never runs in the test runner
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, tokenizer, written, ref = tiny
    numbers = verify.compare_with_llama_cpp(written.path, ref, tokenizer, PROMPTS, n_tokens=8)
    assert numbers == {"greedy_token_agreement": 1.0, "tokens_compared": 24, "tokenize_matches": True}


def test_llama_cpp_rejecting_a_file_is_a_problem(tiny):
    if not llama_cpp_check.available():  # found without importing it: llama.cpp never runs in the test runner
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, tokenizer, written, ref = tiny
    path = _copy(tiny, "cut.gguf")
    path.write_bytes(path.read_bytes()[:4096])
    cpp = verify.compare_with_llama_cpp(path, ref, tokenizer, PROMPTS)
    assert "cannot load cut.gguf" in cpp["error"]
    numbers = {"top1_agreement": 1.0, "max_abs_diff": 0.0, "tokenizer_agreement": 1.0}
    assert verify.judge("f16", numbers, cpp)[0] == [cpp["error"]]


@pytest.mark.parametrize("fault", ["SIGSEGV", "SIGABRT"])
def test_a_crashing_llama_cpp_is_a_clear_result(tiny, monkeypatch, fault):
    """The verifier's child really dies of the signal (test hook); the caller gets a reason, not a dead process."""
    import sys

    if not llama_cpp_check.available():
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, tokenizer, written, ref = tiny
    monkeypatch.setenv(llama_cpp_check.FAULT_ENV, f"{fault}:good")
    cpp = verify.compare_with_llama_cpp(written.path, ref, tokenizer, PROMPTS)
    assert cpp["signal"] == fault and cpp["check"] == "generate from prompt 1"
    check = "in the check 'generate from prompt 1'"
    assert cpp["crashed"].startswith(f"good.gguf: llama.cpp was killed by {fault} {check}")
    assert "-DGGML_NATIVE=OFF" in cpp["crashed"]
    numbers = {"top1_agreement": 1.0, "max_abs_diff": 0.0, "tokenizer_agreement": 1.0}
    assert verify.judge("f16", numbers, cpp) == ([], [])  # withheld by the stage, not a verification failure
    assert "llama_cpp" not in sys.modules


def test_a_hanging_llama_cpp_is_cut_by_the_time_limit(tiny, monkeypatch):
    import time

    if not llama_cpp_check.available():
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, tokenizer, written, ref = tiny
    monkeypatch.setenv(llama_cpp_check.FAULT_ENV, "hang:good")
    start = time.monotonic()
    cpp = verify.compare_with_llama_cpp(written.path, ref, tokenizer, PROMPTS, timeout=15)
    assert time.monotonic() - start < 60
    assert cpp["timeout_seconds"] == 15 and cpp["check"] == "generate from prompt 1"
    assert "llama.cpp hung in the check 'generate from prompt 1' and was stopped after 15 s" in cpp["crashed"]


def test_a_crash_only_in_llama_cpps_extra_cpu_kernels_is_verified_without_them(tiny, monkeypatch):
    """Like the AMX case: the default run dies of SIGSEGV (test hook, only while extra buffer types are on);
    the second run with use_extra_bufts = false checks the file, and the crash is reported as a warning."""
    if not llama_cpp_check.available():
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, tokenizer, written, ref = tiny
    monkeypatch.setenv(llama_cpp_check.FAULT_ENV, "SIGSEGV@extra:good")
    cpp = verify.compare_with_llama_cpp(written.path, ref, tokenizer, PROMPTS, n_tokens=8)
    assert cpp["default_kernels_crashed"].startswith("good.gguf: llama.cpp was killed by SIGSEGV")
    assert (cpp["greedy_token_agreement"], cpp["tokens_compared"], cpp["tokenize_matches"]) == (1.0, 24, True)
    numbers = {"top1_agreement": 1.0, "max_abs_diff": 0.0, "tokenizer_agreement": 1.0}
    problems, warnings = verify.judge("q8_0", numbers, cpp)
    assert problems == [] and len(warnings) == 1 and "use_extra_bufts = false" in warnings[0]


def test_llama_cpp_without_extra_buffer_types_gives_the_same_tokens(tiny):
    if not llama_cpp_check.available():
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    _d, _c, _tok, written, _ref = tiny
    cases = [{"text": p, "generate": 8} for p in PROMPTS]
    default = llama_cpp_check.run_in_child(written.path, cases)
    assert llama_cpp_check.run_in_child(written.path, cases, no_extra_bufts=True) == default
    assert len(default["cases"]) == 3 and all(len(c["generated"]) == 8 for c in default["cases"])
