"""Prove a GGUF file works before anyone is told it exists.

1. Read it back with ``gguf.GGUFReader``: header, tensor names, shapes and types as planned, token count,
   and finite values in every float tensor.
2. Load it with transformers' GGUF loader and compare next-token logits with the merged HF model, and the
   GGUF-built tokenizer's ids with the HF tokenizer's.
3. With llama-cpp-python installed (extra ``gguf-runtime``), in a child process with a time limit: llama.cpp
   must tokenize the rendered chat prompt exactly as training did; greedy tokens from llama.cpp's own tokens
   are compared with transformers'.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.export import llama_cpp_check
from handlers.export.tokenizer_meta import leading_space_only

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


@dataclass
class Probe:
    """One verify prompt: the ids training / transformers make, and the text llama.cpp and Ollama get."""

    text: str  # as transformers encodes it
    ids: list[int]
    special: bool  # add_special_tokens used for ``ids``
    llama_text: str  # as llama.cpp is given it: it adds BOS itself when the GGUF says add_bos_token


def plain_probe(tokenizer: Any, text: str) -> Probe:
    """A plain string, encoded with the tokenizer's own special tokens (BOS where it adds one).

    Where HF gives only the start of the text SentencePiece's leading space (see ``leading_space_only``) the GGUF
    says add_space_prefix = false, so llama.cpp is given that space in the text, as a raw-completion client must.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    lead = backend is not None and leading_space_only(json.loads(backend.to_str()))
    llama_text = " " + text if lead and text and not text.startswith(tuple(tokenizer.all_special_tokens)) else text
    return Probe(text, ids or [tokenizer.bos_token_id or tokenizer.eos_token_id or 0], True, llama_text)


def chat_probe(tokenizer: Any, messages: list[dict[str, str]], gguf_adds_bos: bool) -> Probe:
    """A conversation rendered with a generation prompt: ids exactly as training encodes chats; llama.cpp gets
    the same text minus a leading BOS it adds itself (as the Ollama TEMPLATE leaves it out)."""
    from handlers.modelio import encode_chat_text, render_chat

    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    llama_text = text[len(bos):] if gguf_adds_bos and bos and text.startswith(bos) else text
    return Probe(text, encode_chat_text(tokenizer, text), False, llama_text)


def probes_of(tokenizer: Any, prompts: list[str | Probe]) -> list[Probe]:
    return [p if isinstance(p, Probe) else plain_probe(tokenizer, p) for p in prompts]


def prompt_ids(tokenizer: Any, prompts: list[str | Probe]) -> list[list[int]]:
    """Token ids per prompt as the merged model's tokenizer makes them (never empty)."""
    return [p.ids for p in probes_of(tokenizer, prompts)]


def compare_with_transformers(model_dir: Path, gguf_name: str, ref_model: Any, tokenizer: Any,
                              prompts: list[str | Probe], override_config: bool) -> dict[str, Any]:
    """Next-token logits of the GGUF (loaded by transformers) against the merged model, per prompt.

    ``override_config``: load the GGUF's weights into the merged model's config, for settings transformers'
    GGUF loader cannot read back (long-context RoPE scaling); the GGUF's own metadata is checked elsewhere.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probes = probes_of(tokenizer, prompts)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "gguf_file": gguf_name}
    if override_config:
        kwargs["config"] = ref_model.config
    else:  # Phi3Config defaults pad_token_id to 32000, past a small vocabulary, when the GGUF names no pad
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).eval()
    diffs, agree = [], 0
    for p in probes:
        a, b = _last_logits(ref_model, p.ids), _last_logits(model, p.ids)
        diffs.append(float((a - b).abs().max()))
        agree += int(a.argmax() == b.argmax())
    del model
    gguf_tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_name)
    same_ids = sum(gguf_tok(p.text, add_special_tokens=p.special)["input_ids"] == p.ids for p in probes)
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / len(probes),
            "tokenizer_agreement": same_ids / len(probes), "config_from": "merged" if override_config else "gguf"}


def _mismatch(p: Probe, got: list[int]) -> dict[str, Any]:
    at = next((i for i, (a, b) in enumerate(zip(p.ids, got)) if a != b), min(len(p.ids), len(got)))
    return {"text": p.llama_text[:200], "first_difference_at": at, "training_ids": p.ids[max(0, at - 3):at + 5],
            "llama_cpp_ids": got[max(0, at - 3):at + 5]}


def compare_with_llama_cpp(path: Path, ref_model: Any, tokenizer: Any, prompts: list[str | Probe],
                           n_tokens: int = 8, timeout: float = llama_cpp_check.TIMEOUT_SECONDS
                           ) -> dict[str, Any] | None:
    """llama.cpp (in a child process) tokenizes every prompt as llama.cpp and Ollama will, which must give the
    training ids, then greedy-decodes from its own tokens; transformers decodes from the same tokens and the
    agreement is reported. None: llama-cpp-python is not installed. ``{"crashed": ...}``: llama.cpp died or
    hung, also with its extra CPU buffer types off (nothing is known about the file); ``{"error": ...}``: llama.cpp
    refused the file. A crash that the second run avoids is reported as ``default_kernels_crashed``."""
    if not llama_cpp_check.available():
        return None
    import torch

    probes = probes_of(tokenizer, prompts)
    cases = [{"text": p.llama_text, "generate": n_tokens} for p in probes]
    out = llama_cpp_check.run_in_child(Path(path), cases, timeout=timeout)
    crashed = out.get("crashed") if "signal" in out else None
    if crashed:  # llama.cpp's own CPU kernels (AMX, repacked) crash on some CPUs: check the file without them
        retry = llama_cpp_check.run_in_child(Path(path), cases, timeout=timeout, no_extra_bufts=True)
        out = retry if "cases" in retry else out
    if "cases" not in out:
        return out
    same = total = 0
    mismatches = []
    for p, case in zip(probes, out["cases"]):
        if case["ids"] != p.ids:
            mismatches.append(_mismatch(p, case["ids"]))
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([case["ids"]]), max_new_tokens=n_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)[0, len(case["ids"]):].tolist()
        same += sum(int(a == b) for a, b in zip(ref, case["generated"]))
        total += len(ref)
    result: dict[str, Any] = {"greedy_token_agreement": same / max(total, 1), "tokens_compared": total,
                              "tokenize_matches": not mismatches}
    if mismatches:
        result["tokenize_mismatches"] = mismatches[:3]
        result["tokenize_mismatch_count"] = len(mismatches)
    if crashed:
        result["default_kernels_crashed"] = crashed
    return result


def judge(out_type: str, numbers: dict[str, Any], cpp: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings): float files must agree on top-1 for every prompt, quantized ones on most;
    llama.cpp must load the file and tokenize every prompt exactly as training did (greedy divergence warns).
    A llama.cpp crash is neither: the caller withholds that file (``cpp["crashed"]``)."""
    problems, warnings = [], []
    if cpp is not None and "error" in cpp:
        problems.append(cpp["error"])
    elif cpp is not None and "crashed" not in cpp:
        if not cpp["tokenize_matches"]:
            first = cpp["tokenize_mismatches"][0]
            problems.append(
                f"{out_type}: llama.cpp tokenizes {cpp['tokenize_mismatch_count']} verify prompt(s) differently "
                f"from training (first: {first['text'][:60]!r} at token {first['first_difference_at']}: training "
                f"{first['training_ids']}, llama.cpp {first['llama_cpp_ids']}); the GGUF's tokenizer metadata "
                "does not describe the HF tokenizer (see verification.json)")
        if cpp.get("default_kernels_crashed"):
            warnings.append(
                f"{out_type}: {cpp['default_kernels_crashed']} It was verified with llama.cpp's extra CPU buffer "
                "types off instead (use_extra_bufts = false; llama-cli --no-repack), which is how it runs on this "
                "machine until llama.cpp is rebuilt")
        if cpp["greedy_token_agreement"] < 1.0:
            warnings.append(f"{out_type}: llama.cpp's greedy tokens agree {cpp['greedy_token_agreement']:.2f} "
                            "with transformers from the same prompt tokens")
    need = 1.0 if out_type in ("f16", "bf16") else 0.5
    if numbers["top1_agreement"] < need:
        problems.append(f"{out_type}: top-1 agreement {numbers['top1_agreement']:.2f} with the merged model "
                        f"is below {need:.2f} (max abs logit diff {numbers['max_abs_diff']:.4g})")
    if numbers["tokenizer_agreement"] < 1.0:
        warnings.append(f"{out_type}: transformers' tokenizer rebuilt from the GGUF splits some verify prompts "
                        "differently from the HF tokenizer")
    return problems, warnings
