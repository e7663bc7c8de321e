"""Prove a GGUF file works before anyone is told it exists.

1. Read it back with ``gguf.GGUFReader``: header, tensor names, shapes and types as planned, token count,
   and finite values in every float tensor.
2. Load it with transformers' GGUF loader and compare next-token logits with the merged HF model, and the
   GGUF-built tokenizer's ids with the HF tokenizer's.
3. With llama-cpp-python installed (extra ``gguf-runtime``): load it in llama.cpp and compare greedy tokens.
"""
from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# what GGUFReader raises on a damaged file (it parses with numpy memmaps and struct)
READ_ERRORS = (ValueError, KeyError, IndexError, OverflowError, struct.error, OSError, MemoryError)
FLOAT_TYPES = ("F32", "F16", "BF16")


def _field_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8", "replace")


def read_back(path: Path, expected: list[tuple[str, tuple[int, ...], str]], arch: str,
              n_tokens: int) -> list[str]:
    """Problems found reading ``path`` with the gguf reader (empty list: as written)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except READ_ERRORS as exc:
        return [f"{path.name}: unreadable GGUF ({type(exc).__name__}: {exc}); the file is truncated or corrupt"]
    problems = []
    if _field_str(reader, "general.architecture") != arch:
        problems.append(f"general.architecture is {_field_str(reader, 'general.architecture')!r}, not {arch!r}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_tokens:
        problems.append(f"tokenizer.ggml.tokens has {0 if tokens is None else len(tokens.data)} entries, "
                        f"expected {n_tokens}")
    got = {t.name: t for t in reader.tensors}
    if len(got) != len(expected):
        problems.append(f"{len(got)} tensors, expected {len(expected)}")
    for name, shape, qtype in expected:
        t = got.get(name)
        if t is None:
            problems.append(f"tensor {name} is missing")
            continue
        shape_read = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape_read != tuple(shape) or t.tensor_type.name != qtype:
            problems.append(f"tensor {name}: {t.tensor_type.name} {shape_read}, expected {qtype} {tuple(shape)}")
        elif qtype in FLOAT_TYPES:
            values = gguf.quants.dequantize(t.data, t.tensor_type) if qtype == "BF16" else t.data
            if not np.isfinite(values).all():
                problems.append(f"tensor {name} holds NaN or infinite values")
    return problems


def _last_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt as the merged model's tokenizer makes them (never empty)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        out.append(ids or [tokenizer.bos_token_id or tokenizer.eos_token_id or 0])
    return out


def compare_with_transformers(model_dir: Path, gguf_name: str, ref_model: Any, tokenizer: Any,
                              prompts: list[str], override_config: bool) -> dict[str, Any]:
    """Next-token logits of the GGUF (loaded by transformers) against the merged model, per prompt.

    ``override_config``: load the GGUF's weights into the merged model's config, for settings transformers'
    GGUF loader cannot read back (long-context RoPE scaling); the GGUF's own metadata is checked elsewhere.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32, "gguf_file": gguf_name}
    if override_config:
        kwargs["config"] = ref_model.config
    else:  # Phi3Config defaults pad_token_id to 32000, past a small vocabulary, when the GGUF names no pad
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).eval()
    diffs, agree = [], 0
    for ids in prompt_ids(tokenizer, prompts):
        a, b = _last_logits(ref_model, ids), _last_logits(model, ids)
        diffs.append(float((a - b).abs().max()))
        agree += int(a.argmax() == b.argmax())
    del model
    gguf_tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_name)
    same_ids = sum(gguf_tok(p, add_special_tokens=True)["input_ids"] == tokenizer(p, add_special_tokens=True)["input_ids"]
                   for p in prompts)
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / len(prompts),
            "tokenizer_agreement": same_ids / len(prompts), "config_from": "merged" if override_config else "gguf"}


def compare_with_llama_cpp(path: Path, ref_model: Any, tokenizer: Any, prompts: list[str],
                           n_tokens: int = 8) -> dict[str, Any] | None:
    """Greedy tokens from llama.cpp against transformers' greedy tokens (None: llama-cpp-python absent)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import torch

    try:
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        return {"error": f"llama.cpp cannot load {path.name}: {exc}"}
    same, total = 0, 0
    for ids in prompt_ids(tokenizer, prompts):
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        llm.reset()
        got = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(tok)
            if len(got) >= len(out):
                break
        same += sum(int(a == b) for a, b in zip(out, got))
        total += len(out)
    gguf_ids = llm.tokenize(prompts[0].encode("utf-8"), add_bos=True, special=False)
    del llm
    return {"greedy_token_agreement": same / max(total, 1), "tokens_compared": total,
            "tokenize_matches": gguf_ids == prompt_ids(tokenizer, prompts[:1])[0]}


def judge(out_type: str, numbers: dict[str, Any], cpp: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings): float files must agree on top-1 for every prompt, quantized ones on most;
    llama.cpp must load the file (its greedy tokens and tokenization are reported, divergence warns)."""
    problems, warnings = [], []
    if cpp is not None and "error" in cpp:
        problems.append(cpp["error"])
    elif cpp is not None and (cpp["greedy_token_agreement"] < 1.0 or not cpp["tokenize_matches"]):
        warnings.append(f"{out_type}: llama.cpp's greedy tokens agree {cpp['greedy_token_agreement']:.2f} with "
                        f"transformers (tokenization {'matches' if cpp['tokenize_matches'] else 'differs'})")
    need = 1.0 if out_type in ("f16", "bf16") else 0.5
    if numbers["top1_agreement"] < need:
        problems.append(f"{out_type}: top-1 agreement {numbers['top1_agreement']:.2f} with the merged model "
                        f"is below {need:.2f} (max abs logit diff {numbers['max_abs_diff']:.4g})")
    if numbers["tokenizer_agreement"] < 1.0:
        warnings.append(f"{out_type}: transformers' tokenizer rebuilt from the GGUF splits some verify prompts "
                        "differently from the HF tokenizer")
    return problems, warnings
