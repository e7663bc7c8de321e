"""Every metadata key trainbox writes, compared with llama.cpp's own convert_hf_to_gguf.py on the same folder.

The converter is not a dependency: point TRAINBOX_LLAMA_CPP_SRC at a llama.cpp source tree (e.g. the one vendored
in llama-cpp-python's sdist: ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``, unpack,
``vendor/llama.cpp``). Architecture keys must be identical; the tokenizer/general keys listed in DIFFERENCES
differ on purpose (docs/export.md says why for each).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import export_fixtures as F
from handlers import modelio
from handlers.export.gguf_writer import write_gguf
from handlers.export.tokenizer_meta import read_tokenizer_meta

SRC = os.environ.get("TRAINBOX_LLAMA_CPP_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set TRAINBOX_LLAMA_CPP_SRC to a llama.cpp source tree to compare "
                                                "with its convert_hf_to_gguf.py")
# key -> why trainbox's value is the right one (kept in step with docs/export.md)
DIFFERENCES = {
    "general.name": "the job's model name (+ '(phi3)' for Phi-3 vocabularies); the converter uses the folder name",
    "general.version": "the converter parses one out of the folder name ('mistral-v3' -> 'v3'); trainbox writes "
                       "none: a fine-tune's version is the models/<name>/v<N> folder",
    "tokenizer.ggml.padding_token_id": "trainbox trains with pad = eos when the tokenizer has no pad token and "
                                       "says so; the converter writes none",
    "tokenizer.ggml.add_bos_token": "observed from the HF tokenizer; transformers 5 no longer saves the flag the "
                                    "converter reads, so it leaves llama.cpp's SPM default (true) in place",
    "tokenizer.ggml.add_eos_token": "observed from the HF tokenizer (same reason)",
    "tokenizer.ggml.add_sep_token": "the converter writes false; absent means false in llama.cpp too",
    "tokenizer.ggml.add_space_prefix": "false for transformers 5's prepend_scheme 'first' (no space after special "
                                       "tokens); the converter leaves llama.cpp's default, true",
    "tokenizer.ggml.scores": "derived from the merge order when no tokenizer.model is at hand (the converter "
                             "writes -1000 for every token); added tokens get -1000, special ones 0",
    "tokenizer.ggml.token_type": "<unk> is UNKNOWN (the converter marks every added special token CONTROL)",
    "tokenizer.ggml.tokens": "added tokens are written (the converter reads them from added_tokens.json, which "
                             "transformers 5 does not save, and writes [PAD<n>] instead)",
}
BUILDERS = {"llama-spm": F.tiny_llama_spm, "phi3-spm": F.tiny_phi3,
            "tinyllama": lambda d: F.tiny_real_tokenizer(d, "tinyllama"),
            "mistral-v3": lambda d: F.tiny_real_tokenizer(d, "mistral")}
# Not compared: byte-level BPE vocabularies (builtin:tiny, Qwen2-style) whose pre-tokenizer hash the converter
# does not list; it refuses them ("BPE pre-tokenizer was not recognized"), so there is nothing to compare with.


def _kv(path: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("which", sorted(BUILDERS))
def test_metadata_matches_the_official_converter(tmp_path, which):
    model_dir = BUILDERS[which](tmp_path / which)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = modelio.load_tokenizer(model_dir)
    meta = read_tokenizer_meta(model_dir, config["vocab_size"], tokenizer)
    ours = write_gguf(model_dir, tmp_path / "ours.gguf", "f16", meta, name="tiny-job", config=config,
                      base_model=str(model_dir)).path
    proc = subprocess.run([sys.executable, str(Path(SRC) / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
                           str(tmp_path / "theirs.gguf"), "--outtype", "f16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _kv(ours), _kv(tmp_path / "theirs.gguf")
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differing <= set(DIFFERENCES), {k: (a.get(k), b.get(k)) for k in differing - set(DIFFERENCES)}
    assert not {k for k in differing if not k.startswith(("general.", "tokenizer."))}
