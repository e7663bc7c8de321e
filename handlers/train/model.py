"""Load the base model for the chosen plan and wrap it with LoRA adapters (peft)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from handlers.modelio import load_causal_lm
from handlers.train.data import Encoded, collate_packed
from handlers.train.loss import decoder_of
from handlers.train.plan import TrainPlan
from trainbox.errors import StageFailed
from trainbox.jobspec import LoraSpec

log = logging.getLogger(__name__)


def auto_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear projection of the decoder (q/k/v/o, fused qkv_proj, MLP, ...), never the output head."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise StageFailed("the model has no linear layers to adapt; set train.lora.target_modules explicitly")
    return sorted(names)


def apply_liger_kernels(model: Any) -> bool:
    """Liger's Triton RMSNorm, RoPE and SwiGLU in place of the model's own, where Liger knows the architecture.

    The loss does not go through the patched forward (``loss.head_cross_entropy`` calls Liger's fused linear
    cross-entropy itself), so only the decoder kernels are swapped here.
    """
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.info("liger-kernel is not installed (pip install 'trainbox[gpu]'); using the model's own kernels")
        return False
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("Liger kernels (RMSNorm, RoPE, SwiGLU) applied to this %s model", model.config.model_type)
    return True


def build_model(model_ref: str, plan: TrainPlan, lora: LoraSpec) -> Any:
    """Base model (frozen, maybe quantized) plus trainable LoRA adapters, on ``plan.device``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype = getattr(torch, plan.dtype)
    quantization = {"bits": plan.bits} if plan.method == "qlora" else None
    model = load_causal_lm(model_ref, device=plan.device, dtype=dtype, quantization=quantization)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if plan.device.startswith("cuda"):
        apply_liger_kernels(model)
    checkpointing_kwargs = {"use_reentrant": False}
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    targets = auto_target_modules(model) if lora.target_modules == "auto" else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise StageFailed(f"train.lora.target_modules {targets}: {exc}; use auto or names of linear layers "
                          "of this model (e.g. q_proj, v_proj)") from exc
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d trainable of %d parameters (%.2f%%)", lora.r, lora.alpha,
             ",".join(targets), trainable, total, 100 * trainable / max(total, 1))
    return model


@torch.no_grad()
def packing_is_exact(model: Any, rows: list[Encoded], device: str) -> bool:
    """Whether this model, run on rows packed back to back, gives each row the hidden states it gets alone.

    Packing relies on the attention implementation reading sequence boundaries from ``position_ids``
    (transformers' SDPA, eager, flex and FlashAttention paths do); a model that ignores them would let rows
    attend to each other, so two real rows are checked once before training. No RNG is drawn (eval mode).
    """
    sample = [Encoded(r.input_ids[:32], r.labels[:32]) for r in rows[:2]]
    if len(sample) < 2:
        return True  # one row: nothing can leak between rows
    was_training = model.training
    model.eval()
    try:
        decoder = decoder_of(model)
        packed = {k: v.to(device) for k, v in collate_packed(sample).items() if k != "labels"}
        together = decoder(**packed).last_hidden_state[0]
        alone = torch.cat([decoder(input_ids=torch.tensor([r.input_ids], device=device)).last_hidden_state[0]
                           for r in sample])
    finally:
        model.train(was_training)
    tolerance = 1e-3 if alone.dtype == torch.float32 else 3e-2  # half precision rounds kernels differently
    worst = float((together.float() - alone.float()).abs().max())
    exact = worst <= tolerance * max(1.0, float(alone.float().abs().max()))
    if not exact:
        log.warning("this model's attention does not separate packed rows (max difference %.3g); training on "
                    "length-grouped padded batches instead", worst)
    return exact
