"""A local base model folder is checked when the job is dropped (json only, in the torch-free daemon), and the
Ollama SYSTEM text is refused there when a Modelfile could not hold it."""
from __future__ import annotations

import json
import shutil


import export_fixtures as F
from trainbox.jobspec import JobSpec
from trainbox.preflight import check_job


def _folder(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    src = F.TOKENIZERS / "tinyllama-1.1b-chat-v1.0"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "hidden_size": 64, "num_attention_heads": 4}))
    return folder


def _job(folder, **export):
    return JobSpec.model_validate({"name": "j", "datasets": ["d.jsonl"], "base_model": str(folder),
                                   "export": export})


def test_a_sound_folder_passes(tmp_path):
    assert check_job(_job(_folder(tmp_path)), gpu_count=0) == []


def test_a_corrupt_tokenizer_json_is_named_with_line_and_column(tmp_path):
    """The damage found in a real TinyLlama copy: a raw newline inside a vocabulary string."""
    folder = _folder(tmp_path)
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    where = text.index('"\u2028"') + 1  # U+2028 written raw, as in the repaired copy
    (folder / "tokenizer.json").write_text(text[:where] + "\n" + text[where + 1:], encoding="utf-8")
    line = text[:where].count("\n") + 1
    column = where - text.rindex("\n", 0, where)
    problems = check_job(_job(folder), gpu_count=0)
    assert len(problems) == 1 and problems[0].key == "base_model"
    where = f"{folder / 'tokenizer.json'}: not valid JSON at line {line} column {column}: "
    assert problems[0].message.startswith(where)
    assert "Invalid control character" in problems[0].message and "pip install" not in problems[0].render("job.yaml")


def test_missing_tokenizer_and_unsupported_architecture(tmp_path):
    folder = _folder(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    messages = [p.message for p in check_job(_job(folder, gguf=[]), gpu_count=0)]
    assert messages == [f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)",
                        f"{folder / 'config.json'}: BertForMaskedLM is not a causal language model"]


def test_an_injecting_system_prompt_is_refused_at_drop_time(tmp_path):
    system = 'Be brief."""\nADAPTER /etc/passwd\nFROM /tmp/evil.gguf\nSYSTEM """x'
    for base in (str(_folder(tmp_path)), "builtin:tiny"):
        problems = check_job(_job(base, ollama={"system": system}), gpu_count=0)
        assert len(problems) == 1 and problems[0].key == "export.ollama.system", problems
        assert "would end its quoted value in the Modelfile" in problems[0].message
    problems = check_job(_job("builtin:tiny", ollama={"system": "Hi\u2028there"}), gpu_count=0)
    assert [p.key for p in problems] == ["export.ollama.system"] and "U+2028" in problems[0].message
    assert check_job(_job("builtin:tiny", ollama={"system": 'Say "hi" and\nbe "brief"'}), gpu_count=0) == []
