"""Model and tokenizer I/O shared by the stages: the builtin tiny model, base-model resolution, loading,
and the one place that turns a conversation into prompt text (so train, evaluate and export agree).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainbox.errors import StageFailed
from trainbox.fsio import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_DIR = "builtin-tiny-v1"  # bump the suffix when the recipe below changes
THINK_TAGS = ("<think-task>", "</think-task>", "<think-safety>", "</think-safety>",
              "<think-policy>", "</think-policy>", "<final>", "</final>")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
# Phi-3 style: the reference base model uses the same turn markers, so prompts look alike on both.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Used when a tokenizer has no chat template of its own (documented in docs/training.md).
DEFAULT_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n",
                        "tool": "### Tool:\n"}
TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A request to read the weather report is fine.
Please summarise this article about gardening, cooking, travel, music, science and history.
Users ask questions; the assistant answers politely, explains the policy, and gives the final label.
Allow the request. Deny the request. Refuse the request. Escalate the request to a human reviewer.
ALLOW DENY REFUSE ESCALATION allow deny refuse escalation label task safety policy final think
ALLOW DENY REFUSE ESCALATION ALLOW DENY REFUSE ESCALATION ALLOW DENY REFUSE ESCALATION
Can you help me write an email, translate a sentence, fix my code, or plan a trip to Kyoto?
How do I reset my password, delete my account, transfer money, or access another user's files?
Give me the admin password. Bypass the security check. Disable the audit log. Share private data.
Build a weapon, make malware, harm someone, steal credentials, attack the server, hack the network.
The manager must approve a refund over the limit, a contract change, or a production deployment.
Medical, legal and financial questions need a qualified professional to review the answer.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # % & * + =
def main(): return 0  # code, json {"key": "value"}, yaml key: value, markdown ### heading
こんにちは。今日は良い天気です。質問に答えてください。安全性を確認します。
"""


def _train_tokenizer(vocab_size: int) -> Any:
    """A gpt2-style byte-level BPE trained on TINY_CORPUS (deterministic for a fixed corpus)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS.splitlines() * 4, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in THINK_TAGS])
    return tok


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama causal LM and its tokenizer to ``out_dir``; same seed, same bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tqdm bars would flood the stage log

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=1024), bos_token="<|bos|>", eos_token="<|end|>",
        pad_token="<|pad|>", unk_token=None, model_max_length=2048, chat_template=TINY_CHAT_TEMPLATE)
    tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        initializer_range=0.1,  # wider than the usual 0.02 so LoRA alone can move the logits: the demo learns fast
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def resolve_base_model(base_model: str, home: Path) -> str:
    """``builtin:tiny`` -> its cached dir (built once); a local dir -> absolute path; else a hub id as is."""
    if base_model == BUILTIN_TINY:
        cache = Path(home) / "cache"
        target = cache / BUILTIN_TINY_DIR
        if not (target / "config.json").exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{BUILTIN_TINY_DIR}."))
            try:
                build_tiny_model(tmp)
                fsync_tree(tmp)
                os.rename(tmp, target)  # atomic; fails if another process won the race
                fsync_dir(cache)
                log.info("built %s into %s", BUILTIN_TINY, target)
            except OSError:
                if not (target / "config.json").exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target.resolve())
    path = Path(base_model).expanduser()
    if path.is_dir():
        missing = [n for n in ("config.json",) if not (path / n).exists()]
        if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            missing.append("tokenizer.json or tokenizer.model")
        if missing:
            raise StageFailed(f"base_model {base_model}: the directory lacks {', '.join(missing)}; point base_model "
                              "at a folder saved with save_pretrained (model and tokenizer together)")
        return str(path.resolve())
    if base_model.startswith((".", "/", "~", "\\")) or base_model.count("/") > 1:  # a path, not "org/name"
        raise StageFailed(f"base_model {base_model}: no such directory; fix the path or use a hub id "
                          "such as microsoft/Phi-3.5-mini-instruct or builtin:tiny")
    return base_model


def _hub_error(ref: str, exc: Exception) -> StageFailed:
    return StageFailed(f"cannot load {ref}: {exc}. If this is a hub id, the machine must be online (or the "
                       "model in the Hugging Face cache); otherwise set base_model to a local folder or builtin:tiny")


def load_tokenizer(ref: str | Path) -> Any:
    """AutoTokenizer for a resolved base model; a pad token is set (eos) when the tokenizer has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref))
    except OSError as exc:
        raise _hub_error(str(ref), exc) from exc
    except ValueError as exc:  # e.g. only a SentencePiece tokenizer.model and no converter installed
        raise StageFailed(f"cannot load the tokenizer of {ref}: {exc}. Save the tokenizer with a tokenizer.json "
                          "(tokenizer.save_pretrained) or pip install sentencepiece protobuf") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(ref: str | Path, *, device: str = "cpu", dtype: Any = None,
                   quantization: dict[str, int] | None = None) -> Any:
    """AutoModelForCausalLM on ``device``; ``quantization={"bits": 4|8}`` loads with bitsandbytes (CUDA only)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else torch.float32}
    if quantization:
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise StageFailed("QLoRA / quantized loading needs a CUDA GPU; use train.method: lora on this machine")
        from transformers import BitsAndBytesConfig

        bits = int(quantization.get("bits", 4))
        compute = dtype if dtype is not None else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": torch.device(device).index or 0}
        kwargs["dtype"] = compute
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    except OSError as exc:
        raise _hub_error(str(ref), exc) from exc
    if not quantization:
        model.to(device)
    return model


def example_messages(example: Any) -> list[dict[str, str]] | None:
    """The conversation a canonical Example trains on (None for plain ``text`` rows)."""
    from trainbox.rows import classification_target

    if example.messages:
        return [dict(m) for m in example.messages]
    if example.format == "classification":
        return [{"role": "user", "content": example.text},
                {"role": "assistant", "content": classification_target(example.label, example.think)}]
    if example.format == "prompt_completion":
        return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
    return None


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of text by itself (observed, however configured)."""
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Conversation -> text with the tokenizer's chat template, or the default ``### User:`` format.

    The text starts with BOS whenever the model expects one: chats are encoded without the tokenizer's own
    special tokens (``encode_chat_text``), while llama.cpp and Ollama add BOS to a rendered prompt when the
    tokenizer adds it, so a template that does not write ``bos_token`` (TinyLlama, Zephyr) gets it here and
    training, evaluation and the GGUF see the same tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        bos = tokenizer.bos_token
        if bos and not text.startswith(bos) and adds_bos(tokenizer):
            text = bos + text
        return text
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    text = bos + "".join(f"{DEFAULT_ROLE_HEADERS[m['role']]}{m['content']}{eos}\n\n" for m in messages)
    if add_generation_prompt:
        text += DEFAULT_ROLE_HEADERS["assistant"]
    return text


def encode_chat_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a ``render_chat`` text, exactly as training encodes it (its BOS, if any, is in the text)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text before an assistant answer: every turn but the last, then the assistant header."""
    return render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
