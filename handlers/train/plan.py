"""Decide how to train on this machine: device, precision, LoRA or QLoRA, gradient checkpointing.

Memory estimates are deliberately rough (weights + LoRA optimizer state + activations); they only choose
between modes, and the README says how to force a mode when the guess is wrong.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import StageFailed
from daemon.jobspec import TrainSpec
from handlers.train.requirements import check_train_requirements

log = logging.getLogger(__name__)

GIB = 1024 ** 3
USABLE_GPU_FRACTION = 0.85  # leave room for the CUDA context, fragmentation and the allocator's cache
MULTITHREAD_MIN_HIDDEN = 1024  # below this, intra-op threads cost more than they save (and collapse under load)


@dataclass
class TrainPlan:
    device: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    method: str  # "lora" | "qlora"
    bits: int | None
    gradient_checkpointing: bool
    estimates: dict[str, Any]
    cpu_threads: int = 1


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


def activation_bytes(shape: ModelShape, batch: int, seq: int, bytes_per: int) -> tuple[int, int]:
    """Activations kept for backward (without, with gradient checkpointing), fp32 logits and their grad included."""
    tokens = batch * seq
    per_layer = tokens * (12 * shape.hidden + 4 * shape.intermediate) * bytes_per
    logits = tokens * shape.vocab * 4 * 3
    checkpointed = shape.layers * tokens * shape.hidden * bytes_per + per_layer + logits
    return shape.layers * per_layer + logits, checkpointed


def decide_memory(spec: TrainSpec, shape: ModelShape, bytes_per: int,
                  budget: float | None) -> tuple[str, int | None, bool, dict[str, Any]]:
    """(method, bits, gradient checkpointing, estimates) for a GPU memory budget (None on CPU)."""
    weights = shape.params * bytes_per
    acts, acts_checkpointed = activation_bytes(shape, spec.batch_size, spec.max_seq_length, bytes_per)
    method = spec.method
    if method == "auto":
        # QLoRA costs speed: take it only when half-precision LoRA cannot fit even with checkpointing
        method = "qlora" if budget is not None and weights + acts_checkpointed > budget else "lora"
    bits = spec.bits if method == "qlora" else None
    weight_bytes = shape.params * bits // 8 if bits else weights
    if spec.gradient_checkpointing == "auto":
        checkpointing = budget is not None and weight_bytes + acts > budget
    else:
        checkpointing = bool(spec.gradient_checkpointing)
    estimates = {"params": shape.params, "weight_gib": round(weight_bytes / GIB, 2),
                 "activation_gib": round((acts_checkpointed if checkpointing else acts) / GIB, 2),
                 "gpu_budget_gib": round(budget / GIB, 2) if budget else None}
    return method, bits, checkpointing, estimates


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
    return "cuda:0" if device == "cuda" else device


def make_plan(spec: TrainSpec, ctx_device: str, model_ref: str) -> TrainPlan:
    """Pick the training mode; raises StageFailed for settings this machine cannot run."""
    import torch

    device = resolve_device(spec, ctx_device)
    cuda = device.startswith("cuda")
    problems = check_train_requirements(spec, cuda_available=cuda)
    if problems:
        raise StageFailed("; ".join(problems))
    if spec.precision == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else ("float16" if cuda else "float32")
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[spec.precision]
    shape = model_shape(read_config(model_ref))
    budget = _cuda_total_bytes(device) * USABLE_GPU_FRACTION if cuda else None
    method, bits, checkpointing, estimates = decide_memory(spec, shape, 4 if dtype == "float32" else 2, budget)
    threads = available_cores() if shape.hidden >= MULTITHREAD_MIN_HIDDEN else 1
    log.info("plan: %s on %s, %s, gradient checkpointing %s, %d CPU thread(s) (estimates %s)", method, device,
             dtype, "on" if checkpointing else "off", threads, estimates)
    return TrainPlan(device, dtype, method, bits, checkpointing, estimates, threads)


def available_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def steps_per_epoch(rows: int, batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(math.ceil(rows / batch_size) / accumulation))


def total_steps(spec: TrainSpec, rows: int) -> int:
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch(rows, spec.batch_size, spec.gradient_accumulation_steps)))
