"""Per-architecture GGUF details, as llama.cpp's convert_hf_to_gguf.py does them: hyperparameter keys,
tensor renames (gguf's TensorNameMap), Llama's Q/K permutation and Phi-3's long/short RoPE factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from trainbox.errors import StageFailed
from trainbox.preflight import GGUF_LONGROPE_TYPES, SUPPORTED_ARCHITECTURES, architecture_of, supported_list

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers 5 ``rope_parameters`` or the older ``rope_scaling``/``rope_theta``."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    for key in ("original_max_position_embeddings", "partial_rotary_factor"):
        if key not in params and key in config:
            params[key] = config[key]
    return params


@dataclass
class ArchSpec:
    """What the writer needs to know about one model: names, hparams and tensor transforms."""

    hf_arch: str
    gguf_arch: str
    config: dict[str, Any]

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_head_kv(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.n_head)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def arch_spec(config: dict[str, Any]) -> ArchSpec:
    hf_arch = architecture_of(config)
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise StageFailed(f"GGUF export does not support {hf_arch}; supported: {supported_list()}. "
                          "Set export.gguf: [] to export the merged model only")
    return ArchSpec(hf_arch, SUPPORTED_ARCHITECTURES[hf_arch], config)


def write_hparams(writer: Any, spec: ArchSpec) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for this architecture."""
    c = spec.config
    rope = rope_params(c)
    writer.add_context_length(int(c["max_position_embeddings"]))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_block_count(int(c["num_hidden_layers"]))
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = str(rope.get("rope_type", "default")).lower()
    if spec.gguf_arch == "phi3":
        rot = float(rope.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(rot * int(c["hidden_size"])) // spec.n_head)
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                          c["max_position_embeddings"])))
        writer.add_sliding_window(int(c.get("sliding_window") or 0))
        return
    if spec.gguf_arch == "llama":
        writer.add_vocab_size(int(c["vocab_size"]))
        writer.add_rope_dimension_count(spec.head_dim)
    if c.get("head_dim") or spec.head_dim != int(c["hidden_size"]) // spec.n_head:
        # the converter writes these whenever config.json names head_dim (Phi-3 returned above: it never does)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    import gguf

    if rope_type == "linear" and "factor" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and "factor" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def permute_heads(spec: ArchSpec, hf_name: str) -> int | None:
    """Head count to permute this tensor's rows by (Llama Q and K), or None to keep it as stored."""
    if spec.gguf_arch != "llama":
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return spec.n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return spec.n_head_kv
    return None


def gguf_name(spec: ArchSpec, name_map: Any, hf_name: str) -> str | None:
    """GGUF tensor name for an HF tensor, or None when the tensor is not written."""
    if hf_name.endswith(SKIPPED_SUFFIXES):
        return None
    if spec.tied and hf_name == "lm_head.weight":
        return None  # llama.cpp reuses token_embd when output.weight is absent
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise StageFailed(f"tensor {hf_name} has no GGUF name for {spec.gguf_arch}; the checkpoint does not look "
                          f"like a plain {spec.hf_arch}")
    return new


def extra_tensors(spec: ArchSpec) -> Iterator[tuple[str, np.ndarray]]:
    """Generated tensors: Phi-3 long/short RoPE factors (128k models), Llama 3 rope_freqs."""
    import gguf

    c = spec.config
    rope = rope_params(c)
    rope_type = str(rope.get("rope_type", "")).lower()
    if spec.gguf_arch == "phi3" and rope.get("long_factor"):
        if rope_type not in GGUF_LONGROPE_TYPES:
            raise StageFailed(f"Phi-3 rope type {rope_type!r} is not supported in GGUF (longrope only)")
        long_f, short_f = rope["long_factor"], rope.get("short_factor")
        rot = float(rope.get("partial_rotary_factor", 1.0))
        half = int(rot * int(c["hidden_size"])) // spec.n_head // 2
        if short_f is None or len(long_f) != half or len(short_f) != half:
            raise StageFailed(f"Phi-3 rope long/short factors must each have {half} entries")
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long_f, np.float32)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(short_f, np.float32)
    if spec.gguf_arch == "llama" and rope_type == "llama3":
        base = float(rope["rope_theta"])
        dim = spec.head_dim
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = float(rope.get("factor", 8.0))
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old_ctx = float(rope.get("original_max_position_embeddings", 8192))
        out = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old_ctx / high:
                out.append(1.0)
            elif wavelen > old_ctx / low:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.asarray(out, np.float32)


def longrope_attn_factor(spec: ArchSpec) -> float | None:
    """Phi-3 longrope attention factor (written as rope.scaling.attn_factor), None when not longrope."""
    rope = rope_params(spec.config)
    if spec.gguf_arch != "phi3" or not rope.get("long_factor"):
        return None
    orig = int(rope.get("original_max_position_embeddings", spec.config["max_position_embeddings"]))
    scale = int(spec.config["max_position_embeddings"]) / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
