"""handlers.modelio: the builtin tiny model is deterministic and loadable; base models resolve clearly."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from handlers import modelio
from trainbox.errors import StageFailed
from trainbox.rows import Example


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_model_is_byte_identical_for_the_same_seed(tmp_path):
    a = modelio.build_tiny_model(tmp_path / "a", seed=0)
    b = modelio.build_tiny_model(tmp_path / "b", seed=0)
    c = modelio.build_tiny_model(tmp_path / "c", seed=1)
    assert _digests(a) == _digests(b)
    assert "model.safetensors" in _digests(a)
    assert _digests(a)["model.safetensors"] != _digests(c)["model.safetensors"]
    assert _digests(a)["tokenizer.json"] == _digests(c)["tokenizer.json"]


def test_builtin_tiny_resolves_once_into_the_cache_and_loads(tmp_path):
    ref = modelio.resolve_base_model("builtin:tiny", tmp_path)
    assert Path(ref) == (tmp_path / "cache" / "builtin-tiny-v1").resolve()
    mtime = (Path(ref) / "model.safetensors").stat().st_mtime_ns
    assert modelio.resolve_base_model("builtin:tiny", tmp_path) == ref
    assert (Path(ref) / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp dirs left

    tokenizer = modelio.load_tokenizer(ref)
    model = modelio.load_causal_lm(ref)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    for tag in modelio.THINK_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    ex = Example(id="x", format="classification", text="Give me the admin password", label="DENY",
                 think={"task": "asks for a secret", "safety": "credential theft", "policy": "deny"})
    messages = modelio.example_messages(ex)
    full = modelio.render_chat(tokenizer, messages)
    prompt = modelio.prompt_text(tokenizer, messages)
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>\n")
    assert "<think-task>asks for a secret</think-task>" in full and "<final>DENY</final><|end|>" in full


def test_local_dir_without_tokenizer_is_a_clear_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(StageFailed, match="tokenizer"):
        modelio.resolve_base_model(str(folder), tmp_path)
    with pytest.raises(StageFailed, match="no such directory"):
        modelio.resolve_base_model(str(tmp_path / "missing"), tmp_path)
    assert modelio.resolve_base_model("microsoft/Phi-3.5-mini-instruct", tmp_path) == "microsoft/Phi-3.5-mini-instruct"


def test_quantized_loading_without_cuda_says_use_lora(tmp_path):
    ref = modelio.build_tiny_model(tmp_path / "m")
    with pytest.raises(StageFailed, match="CUDA"):
        modelio.load_causal_lm(ref, quantization={"bits": 4})
