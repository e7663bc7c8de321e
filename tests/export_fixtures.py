"""Tiny real models for the export tests: Llama / Qwen2 / Phi3 with tokenizers built here, a LoRA adapter,
and a StageContext wired like the daemon wires the export stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from handlers.context import StageContext, load_context

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please summarise this article about gardening, cooking and travel.",
    "Allow the request. Deny the request. Refuse the request politely.",
    "How do I reset my password or plan a trip to Kyoto in spring?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ]",
    "Hello world, hello trainbox, hello llama.cpp and Ollama users.",
    "def main(): return 0  # code and json {\"key\": \"value\"}",
] * 3
PHI3_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def train_sentencepiece(out_dir: Path, vocab_size: int = 320) -> Path:
    """A SentencePiece BPE model with byte fallback (Llama-style), trained on CORPUS."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, minloglevel=2, num_threads=1)
    text.unlink()
    (out_dir / "sp.vocab").unlink()
    return (out_dir / "sp.model").rename(out_dir / "tokenizer.model")


def spm_hf_tokenizer(sp_model: Path, **kwargs: Any) -> Any:
    """An HF LlamaTokenizer with the SentencePiece model's pieces and merge order (no protobuf needed)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    scores = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.vocab_size())}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), **kwargs)


def bpe_tokenizer(special: list[str], split: str | None) -> Any:
    """A byte-level BPE (gpt2-style) tokenizer trained on CORPUS; ``split`` is a Qwen2-style regex or None."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _save(model_cls: Any, config: Any, tokenizer: Any, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # random norms, so a wrong norm mapping shows up in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_llama_spm(out_dir: Path, seed: int = 0, added: bool = True) -> Path:
    """Tiny Llama with a SentencePiece-style tokenizer; ``added``: chat special tokens + a plain added token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sp_model = train_sentencepiece(out_dir)
    tok = spm_hf_tokenizer(sp_model, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
        tok.add_tokens(["<think>"])
        tok.chat_template = PHI3_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **SMALL)
    return _save(LlamaForCausalLM, config, tok, out_dir, seed)


def tiny_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen2 (q/k/v biases, tied embeddings) with a ChatML byte-level BPE tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN2_SPLIT)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, eos_token_id=tok.eos_token_id, **SMALL)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = _save(Qwen2ForCausalLM, config, tok, out_dir, seed)
    with torch.no_grad():  # Qwen2 inits biases to zero; make them count
        from safetensors.torch import load_file, save_file

        sd = load_file(model_dir / "model.safetensors")
        for k in sd:
            if k.endswith("proj.bias"):
                sd[k] = torch.randn_like(sd[k]) * 0.5
        save_file(sd, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def tiny_phi3(out_dir: Path, seed: int = 0, longrope: bool = False) -> Path:
    """Tiny Phi-3 (fused qkv and gate_up) with a SentencePiece-style tokenizer; ``longrope``: 128k-style."""
    from transformers import Phi3Config, Phi3ForCausalLM

    sp_model = train_sentencepiece(out_dir)
    tok = spm_hf_tokenizer(sp_model, unk_token="<unk>", bos_token="<s>", eos_token="<|end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]})
    tok.chat_template = PHI3_TEMPLATE
    extra: dict[str, Any] = {}
    if longrope:
        half = SMALL["hidden_size"] // SMALL["num_attention_heads"] // 2
        extra = dict(max_position_embeddings=2048, original_max_position_embeddings=256,
                     rope_scaling={"rope_type": "longrope", "long_factor": [1.0 + i / 2 for i in range(half)],
                                   "short_factor": [1.0 + i / 8 for i in range(half)]})
    params = {**SMALL, **extra}
    config = Phi3Config(vocab_size=len(tok), bos_token_id=1, eos_token_id=tok.eos_token_id, pad_token_id=None,
                        tie_word_embeddings=False, **params)
    return _save(Phi3ForCausalLM, config, tok, out_dir, seed)


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter on every linear layer with non-zero B, so merging changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    return out_dir


def export_context(tmp_path: Path, base_dir: Path, *, export: dict[str, Any] | None = None,
                   evaluate: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> StageContext:
    """Train-stage outputs (adapter + tokenizer) next to an export stage dir, as the daemon lays them out."""
    from transformers import AutoTokenizer

    train_dir = tmp_path / "train"
    make_adapter(base_dir, train_dir / "adapter")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(train_dir / "tokenizer")
    stage_dir = tmp_path / "export"
    stage_dir.mkdir()
    results: dict[str, Any] = {
        "train": {"artifacts": {"adapter": "adapter", "tokenizer": "tokenizer"},
                  "summary": {"base_model_path": str(base_dir), "steps": 10, "final_loss": 1.23}},
        "prepare": {"summary": {"rows": {"train": 8, "val": 1, "test": 1}}}}
    if evaluate is not None:
        results["evaluate"] = {"summary": evaluate}
    spec = {"stage": "export", "job_id": "job-1", "home": str(tmp_path),
            "job": {"name": "tiny-job", "datasets": ["d.jsonl"], "base_model": str(base_dir),
                    "export": export or {}},
            "datasets": [{"name": "d.jsonl", "sha256": "ab" * 32, "path": str(tmp_path / "d.jsonl"),
                          "format": "chat", "rows": 10}],
            "stage_dirs": {"train": str(train_dir), "export": str(stage_dir)},
            "results": results, "model": model}
    (stage_dir / "stage.json").write_text(json.dumps(spec))
    return load_context(stage_dir)


TOKENIZERS = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "[INST] {{ message['content'] }}[/INST]{% elif message['role'] == 'assistant' %}"
                    " {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TINY_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


def mistral_v3_tokenizer() -> Any:
    """Mistral 7B Instruct v0.3's SentencePiece model (shipped by mistral-common) as an HF tokenizer."""
    import mistral_common

    sp_model = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    tok = spm_hf_tokenizer(sp_model, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})  # control pieces, as in HF
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def tiny_real_tokenizer(out_dir: Path, which: str, seed: int = 0) -> Path:
    """A tiny random model around a real tokenizer: ``phi3`` (Phi-3-mini-4k, vocab padded to 32064 like the
    real model), ``tinyllama`` (Llama, Zephyr-style template without bos_token) or ``mistral`` (v3)."""
    import shutil

    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Phi3Config, Phi3ForCausalLM)

    out_dir.mkdir(parents=True, exist_ok=True)
    if which == "mistral":
        tok = mistral_v3_tokenizer()
    else:
        src = TOKENIZERS / {"phi3": "phi3-mini-4k-instruct", "tinyllama": "tinyllama-1.1b-chat-v1.0"}[which]
        for f in src.iterdir():
            if f.name != "LICENSE":
                shutil.copy(f, out_dir / f.name)
        tok = AutoTokenizer.from_pretrained(out_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if which == "phi3":
        config = Phi3Config(vocab_size=32064, pad_token_id=tok.pad_token_id, **ids, **TINY_DIMS)
        return _save(Phi3ForCausalLM, config, tok, out_dir, seed)
    if which == "mistral":
        config = MistralConfig(vocab_size=len(tok), **ids, **TINY_DIMS)
        return _save(MistralForCausalLM, config, tok, out_dir, seed)
    config = LlamaConfig(vocab_size=len(tok), **ids, **TINY_DIMS)
    return _save(LlamaForCausalLM, config, tok, out_dir, seed)
