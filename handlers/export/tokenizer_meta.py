"""Tokenizer metadata for GGUF: SentencePiece-style ('llama') and byte-level BPE ('gpt2') vocabularies.

Follows llama.cpp's convert_hf_to_gguf.py: tokens in id order padded to the model's vocab size, scores and
token types (from ``tokenizer.model`` when one is at hand, else derived from ``tokenizer.json``), merges,
special token ids, add-bos/add-eos flags and the chat template.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainbox.errors import StageFailed

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
ADDED_TOKEN_SCORE = -1000.0  # what llama.cpp gives added tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Split regexes of known byte-level BPE pre-tokenizers -> llama.cpp's tokenizer.ggml.pre name
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE = {_GPT2_SPLIT: "gpt-2", _QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


@dataclass
class TokenizerMeta:
    """Everything the GGUF tokenizer section holds."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def token(self, kind: str) -> str | None:
        tid = self.special_ids.get(kind)
        return self.tokens[tid] if tid is not None else None


def _pre_tokenizers(tj: dict[str, Any]) -> list[dict[str, Any]]:
    pre = tj.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [pre])) if pre else []


def _split_pattern(tj: dict[str, Any]) -> str | None:
    for p in _pre_tokenizers(tj):
        if p.get("type") == "Split":
            pattern = p.get("pattern", {})
            return pattern.get("Regex") or pattern.get("String")
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return _GPT2_SPLIT
    return None


def _merges(tj: dict[str, Any]) -> list[str]:
    merges = tj["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):  # [["a", "b"], ...] since tokenizers 0.20
        # llama.cpp's encoding of a literal space inside a merge part
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def _base_vocab(tj: dict[str, Any]) -> tuple[dict[int, str], dict[int, float]]:
    model = tj["model"]
    if model["type"] == "Unigram":
        return ({i: p for i, (p, _s) in enumerate(model["vocab"])},
                {i: float(s) for i, (_p, s) in enumerate(model["vocab"])})
    return {i: t for t, i in model["vocab"].items()}, {}


def _derived_bpe_scores(tj: dict[str, Any], pieces: dict[int, str]) -> dict[int, float]:
    """SentencePiece-BPE scores from merge ranks: the earlier a merge, the higher its result scores.

    llama.cpp's SPM tokenizer merges by score, so this reproduces tokenizer.json's merge order. Pieces that
    no merge produces (single characters) rank below every merge.
    """
    rank: dict[str, int] = {}
    for i, m in enumerate(_merges(tj)):
        left, right = m.split(" ", 1)
        rank.setdefault(left + right, i)
    n = len(rank)
    return {i: -float(rank[p]) if p in rank else -float(n + i) for i, p in pieces.items()}


def _sentencepiece_file(dirs: list[Path], pieces: dict[int, str]) -> Any | None:
    """A ``tokenizer.model`` whose pieces match the tokenizer's vocabulary, loaded, or None."""
    for d in dirs:
        path = Path(d) / "tokenizer.model"
        if not path.is_file():
            continue
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if all(pieces.get(i, sp.IdToPiece(i)) == sp.IdToPiece(i) for i in range(sp.vocab_size())):
            return sp
        log.warning("%s does not match tokenizer.json; scores are derived from the merges instead", path)
    return None


def _sp_type(sp: Any, i: int) -> int:
    if sp.IsUnknown(i):
        return UNKNOWN
    if sp.IsControl(i):
        return CONTROL
    if sp.IsUnused(i):
        return UNUSED
    if sp.IsByte(i):
        return BYTE
    return NORMAL


def looks_special(token: str) -> bool:
    """llama.cpp treats these added tokens as control tokens even when not marked special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _metaspace_scheme(tj: dict[str, Any]) -> str | None:
    for p in _pre_tokenizers(tj):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") if p.get("add_prefix_space", True) else "never"
    return None


def leading_space_only(tj: dict[str, Any]) -> bool:
    """HF prepends SentencePiece's space only to the very start of the text, never after a special token
    (Metaspace ``prepend_scheme: first``, what transformers 5 builds for Llama-style tokenizers)."""
    return _metaspace_scheme(tj) == "first"


def _add_space_prefix(tj: dict[str, Any]) -> bool:
    """llama.cpp's add_space_prefix puts a space before the text *after every special token*, which is HF's
    "always" scheme. For "first" it must be off: chat prompts start with a special token, and HF adds no space
    after one; only text that starts with a plain word differs (HF gives it a leading space, llama.cpp not)."""
    scheme = _metaspace_scheme(tj)
    if scheme is not None:
        return scheme == "always"
    norm = tj.get("normalizer") or {}
    for n in norm.get("normalizers", [norm]):
        if n.get("type") == "Prepend":
            return True
    return False


def _special_ids(hf_tokenizer: Any, vocab_size: int) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(hf_tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            ids[kind] = tid
    return ids


def _add_flags(hf_tokenizer: Any, ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS by itself (observed, which covers every way of configuring it)."""
    encoded = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in ids and len(encoded) > len(plain) and encoded[0] == ids["bos"]
    add_eos = "eos" in ids and len(encoded) > len(plain) and encoded[-1] == ids["eos"]
    return add_bos, add_eos


def read_tokenizer_meta(tokenizer_dir: Path, vocab_size: int, hf_tokenizer: Any,
                        extra_dirs: tuple[Path, ...] = ()) -> TokenizerMeta:
    """Build GGUF tokenizer metadata from a saved HF tokenizer (``tokenizer.json``) padded to ``vocab_size``.

    ``extra_dirs`` are searched for a matching ``tokenizer.model`` (e.g. the base model folder), whose real
    SentencePiece scores and types are used when found.
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise StageFailed(f"{path} is missing: GGUF export needs a fast tokenizer saved with save_pretrained")
    tj = json.loads(path.read_text(encoding="utf-8"))
    kind = tj["model"]["type"]
    byte_level = any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(tj))
    if kind == "Unigram" or (kind == "BPE" and tj["model"].get("byte_fallback")):
        model = "llama"
    elif kind == "BPE" and byte_level:
        model = "gpt2"
    else:
        raise StageFailed(f"{path}: a {kind} tokenizer cannot be written to GGUF; supported are SentencePiece-"
                          "style (BPE with byte fallback, Unigram) and byte-level BPE tokenizers")
    pieces, scores_by_id = _base_vocab(tj)
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    top = max([*pieces, *added], default=-1) + 1
    if top > vocab_size:
        raise StageFailed(f"the tokenizer has {top} tokens but the model only {vocab_size} embeddings; "
                          "resize the model's embeddings (model.resize_token_embeddings) before training")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    scores = [-10000.0] * vocab_size
    meta = TokenizerMeta(model=model, pre="default", tokens=tokens, token_types=types)
    sp = None
    if model == "llama":
        sp = _sentencepiece_file([Path(tokenizer_dir), *extra_dirs], pieces)
        if sp is None and kind == "BPE":
            scores_by_id = _derived_bpe_scores(tj, pieces)
        meta.add_space_prefix = _add_space_prefix(tj)
    for i, piece in pieces.items():
        tokens[i] = piece
        if sp is not None and i < sp.vocab_size():
            types[i], scores[i] = _sp_type(sp, i), float(sp.GetScore(i))
        else:
            types[i] = BYTE if model == "llama" and _BYTE_TOKEN.fullmatch(piece) else NORMAL
            scores[i] = scores_by_id.get(i, 0.0)
    unk = tj["model"].get("unk_token")
    for i, a in sorted(added.items()):
        content = a["content"]
        if sp is not None and i < sp.vocab_size() and types[i] in (UNKNOWN, CONTROL) and tokens[i] == content:
            continue  # SentencePiece already says what it is (and its score)
        tokens[i] = content
        if content == unk and model == "llama":
            types[i], scores[i] = UNKNOWN, scores_by_id.get(i, 0.0)
        elif a.get("special") or looks_special(content):
            types[i], scores[i] = CONTROL, (0.0 if i in pieces else ADDED_TOKEN_SCORE)
        else:
            types[i], scores[i] = USER_DEFINED, ADDED_TOKEN_SCORE
    if model == "gpt2":
        meta.merges = _merges(tj)
        pattern = _split_pattern(tj)
        meta.pre = KNOWN_PRE.get(pattern or "", "default")
        if meta.pre == "default":
            meta.warnings.append("unrecognised byte-level pre-tokenizer: llama.cpp will split text with its "
                                 "default regex, so its tokens may differ from transformers' on some text")
    else:
        meta.scores = scores
    meta.special_ids = _special_ids(hf_tokenizer, vocab_size)
    meta.add_bos, meta.add_eos = _add_flags(hf_tokenizer, meta.special_ids)
    template = getattr(hf_tokenizer, "chat_template", None)
    meta.chat_template = template if isinstance(template, str) else None
    return meta


def add_tokenizer_to_writer(writer: Any, meta: TokenizerMeta) -> None:
    """Write ``meta`` into a ``gguf.GGUFWriter`` under llama.cpp's key names."""
    writer.add_tokenizer_model(meta.model)
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    writer.add_token_types(meta.token_types)
    if meta.merges:
        writer.add_token_merges(meta.merges)
    for kind, tid in meta.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.add_space_prefix is not None:
        writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
