"""Decide how to train on this machine: device, precision, LoRA or QLoRA, gradient checkpointing, tokens per pass.

Memory estimates are deliberately rough (weights + LoRA optimizer state + activations); they only choose
between modes, and docs/training.md says how to force a mode when the guess is wrong.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlers.train.loss import CHUNK_TOKENS
from trainbox.errors import StageFailed
from trainbox.jobspec import TrainSpec

log = logging.getLogger(__name__)

GIB = 1024 ** 3
USABLE_GPU_FRACTION = 0.85  # leave room for the CUDA context, fragmentation and the allocator's cache
MULTITHREAD_MIN_HIDDEN = 1024  # below this, intra-op threads cost more than they save (and collapse under load)
CPU_TOKENS_PER_PASS = 1024
CUDA_CONTEXT = GIB  # CUDA context and kernels: on the card, though max_memory_allocated never counts it


@dataclass
class TrainPlan:
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    method: str  # "lora" | "qlora"
    bits: int | None
    gradient_checkpointing: bool
    estimates: dict[str, Any]
    cpu_threads: int = 1
    token_budget: int | None = None  # tokens per forward pass; None = batch_size x longest row
    reason: str = ""


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Parameter count from a config.json (decoder-only transformer formula, embeddings included)."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv = int(config.get("num_key_value_heads") or heads)
    kv_dim = hidden * kv // heads
    per_layer = hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * inter
    tied = bool(config.get("tie_word_embeddings", False))
    params = layers * per_layer + vocab * hidden * (1 if tied else 2)
    return ModelShape(params, hidden, layers, inter, vocab)


def read_config(model_ref: str) -> dict[str, Any]:
    path = Path(model_ref) / "config.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    from transformers import AutoConfig  # hub id: the config is small

    return AutoConfig.from_pretrained(model_ref).to_dict()


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters with LoRA on every linear layer (attention ~ 4 square maps, MLP 3 maps)."""
    return shape.layers * r * (8 * shape.hidden + 3 * (shape.hidden + shape.intermediate))


def activation_bytes(shape: ModelShape, tokens: int, bytes_per: int) -> tuple[int, int]:
    """Activations kept for backward over ``tokens`` tokens of one forward pass (without, with gradient
    checkpointing). The loss runs chunk by chunk (``loss.CHUNK_TOKENS``): one chunk of float32 logits and
    its softmax, not the whole sequence's."""
    per_layer = tokens * (12 * shape.hidden + 4 * shape.intermediate) * bytes_per
    logits = min(tokens, CHUNK_TOKENS) * shape.vocab * 4 * 2
    checkpointed = shape.layers * tokens * shape.hidden * bytes_per + per_layer + logits
    return shape.layers * per_layer + logits, checkpointed


@dataclass
class MemoryPlan:
    method: str
    bits: int | None
    gradient_checkpointing: bool
    token_budget: int
    reason: str
    estimates: dict[str, Any]


def _fixed_bytes(spec: TrainSpec, shape: ModelShape, bytes_per: int, bits: int | None) -> int:
    """Weights plus the LoRA parameters, gradients and AdamW moments (float32), plus the CUDA context."""
    weights = shape.params * bits // 8 if bits else shape.params * bytes_per
    return weights + lora_params(shape, spec.lora.r) * 16 + CUDA_CONTEXT


def decide_memory(spec: TrainSpec, shape: ModelShape, bytes_per: int, budget: float | None) -> MemoryPlan:
    """Method, checkpointing and tokens per forward pass for a GPU memory budget (None on CPU).

    Preference: LoRA in half precision before QLoRA (quantized matmuls are slower), no checkpointing before
    checkpointing (it recomputes the forward), and among those the largest token budget up to
    ``batch_size x max_seq_length`` that fits; one full row per forward pass is the least.
    """
    full = spec.batch_size * spec.max_seq_length
    if budget is None:
        # CPU attention with a packed mask costs tokens^2: a few rows per pass beat one long pass
        full = min(full, max(spec.max_seq_length, CPU_TOKENS_PER_PASS))
        method = "lora" if spec.method == "auto" else spec.method
        checkpointing = bool(spec.gradient_checkpointing) if spec.gradient_checkpointing != "auto" else False
        reason = "CPU: no GPU memory limit, so plain LoRA" if spec.method == "auto" else f"{method} as set"
        return MemoryPlan(method, spec.bits if method == "qlora" else None, checkpointing, full, reason,
                          _estimates(spec, shape, bytes_per, None, checkpointing, full, None))
    methods = ["lora", "qlora"] if spec.method == "auto" else [spec.method]
    checkpointings = [False, True] if spec.gradient_checkpointing == "auto" else [bool(spec.gradient_checkpointing)]
    for method in methods:
        bits = spec.bits if method == "qlora" else None
        for checkpointing in checkpointings:
            tokens = _largest_fitting_tokens(shape, bytes_per, budget - _fixed_bytes(spec, shape, bytes_per, bits),
                                             checkpointing, spec.max_seq_length, full)
            if tokens:
                reason = (f"{method}{f' {bits}-bit' if bits else ''}, gradient checkpointing "
                          f"{'on' if checkpointing else 'off'}, {tokens} tokens per forward pass: the first "
                          f"choice (faster to slower) whose estimate fits {budget / GIB:.1f} GiB")
                return MemoryPlan(method, bits, checkpointing, tokens, reason,
                                  _estimates(spec, shape, bytes_per, bits, checkpointing, tokens, budget))
    method, checkpointing = methods[-1], checkpointings[-1]
    bits = spec.bits if method == "qlora" else None
    reason = (f"nothing fits the estimate of {budget / GIB:.1f} GiB; trying {method} with gradient checkpointing "
              f"{'on' if checkpointing else 'off'} and one row per forward pass (lower train.max_seq_length or "
              "lora.r if it runs out of memory)")
    return MemoryPlan(method, bits, checkpointing, spec.max_seq_length, reason,
                      _estimates(spec, shape, bytes_per, bits, checkpointing, spec.max_seq_length, budget))


def _largest_fitting_tokens(shape: ModelShape, bytes_per: int, room: float, checkpointing: bool, least: int,
                            most: int) -> int | None:
    def fits(tokens: int) -> bool:
        return activation_bytes(shape, tokens, bytes_per)[checkpointing] <= room

    if not fits(least):
        return None
    tokens = least
    while tokens < most and fits(min(most, tokens * 2)):
        tokens = min(most, tokens * 2)
    return tokens


def _estimates(spec: TrainSpec, shape: ModelShape, bytes_per: int, bits: int | None, checkpointing: bool,
               tokens: int, budget: float | None) -> dict[str, Any]:
    return {"params": shape.params, "weight_gib": round((shape.params * bits // 8 if bits else shape.params *
                                                         bytes_per) / GIB, 2),
            "lora_state_gib": round(lora_params(shape, spec.lora.r) * 16 / GIB, 2),
            "activation_gib": round(activation_bytes(shape, tokens, bytes_per)[checkpointing] / GIB, 2),
            "tokens_per_forward": tokens, "gpu_budget_gib": round(budget / GIB, 2) if budget else None}


def _cuda_total_bytes(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def resolve_device(spec: TrainSpec, ctx_device: str) -> str:
    import torch

    device = ctx_device if spec.device == "auto" else spec.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        if spec.device == "auto":
            return "cpu"
        raise StageFailed(f"train.device: {spec.device} but torch sees no CUDA GPU; set train.device: auto or cpu")
    # under torchrun each rank takes its own GPU among the ones the daemon made visible
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device


def make_plan(spec: TrainSpec, ctx_device: str, model_ref: str) -> TrainPlan:
    """Pick the training mode for settings ``run_train`` has checked against this machine (trainbox.preflight)."""
    import torch

    device = resolve_device(spec, ctx_device)
    cuda = device.startswith("cuda")
    if spec.precision == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else ("float16" if cuda else "float32")
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[spec.precision]
    shape = model_shape(read_config(model_ref))
    budget = None
    if cuda:
        card = _cuda_total_bytes(device)
        budget = min(card, spec.profile_bytes() or card) * USABLE_GPU_FRACTION
    memory = decide_memory(spec, shape, 4 if dtype == "float32" else 2, budget)
    threads = available_cores() if shape.hidden >= MULTITHREAD_MIN_HIDDEN else 1
    log.info("plan: %s on %s, %s, gradient checkpointing %s, %d tokens per forward pass, %d CPU thread(s) "
             "(estimates %s)", memory.method, device, dtype, "on" if memory.gradient_checkpointing else "off",
             memory.token_budget, threads, memory.estimates)
    if spec.method == "auto" or spec.gradient_checkpointing == "auto" or spec.profile:
        log.info("plan chosen because: %s", memory.reason)
    if spec.profile and not cuda:
        log.info("train.profile %s sizes GPU memory; this run is on the CPU, where it changes nothing", spec.profile)
    return TrainPlan(device, dtype, memory.method, memory.bits, memory.gradient_checkpointing, memory.estimates,
                     threads, memory.token_budget, memory.reason)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(math.ceil(rows / batch_size) / accumulation))


def total_steps(spec: TrainSpec, rows: int) -> int:
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch(rows, spec.batch_size, spec.gradient_accumulation_steps)))
