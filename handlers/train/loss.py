"""Next-token loss without the full logits: the output head and cross-entropy run chunk by chunk.

A 32k vocabulary at 2048 tokens makes float32 logits of 256 MiB per row, and their gradient as much again.
Here only label positions reach the head, at most ``CHUNK_TOKENS`` of them at a time, and the gradient for
the hidden states is computed in the same pass (as Liger's fused linear cross-entropy does on CUDA, which is
used instead when installed), so no chunk's logits are kept for backward.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1024  # logits alive at once: CHUNK_TOKENS x vocab x 4 bytes (128 MiB at a 32k vocabulary)


def causal_lm_of(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: Any) -> Any:
    """The decoder stack that returns the final (normed) hidden states, without the output head."""
    return causal_lm_of(model).get_decoder()


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``; the hidden-state gradient is computed in the forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.T).float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()  # in place: one pass over the chunk's logits, no copies
            sums = exps.sum(dim=-1)
            total += (top.squeeze(1) + sums.log() - picked).sum()
            if grad is not None:
                # d loss / d h = softmax @ W - W[target]; dividing by the sums after the matmul is cheaper
                grad[start:start + chunk] = ((exps.to(h.dtype) @ weight) / sums[:, None].to(h.dtype)
                                             - weight[t]).to(h.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def _chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor, scale: float | None,
                softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _liger_loss() -> Any | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")


def head_cross_entropy(model: Any, hidden: torch.Tensor, targets: torch.Tensor,
                       chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of the output head over ``hidden`` (tokens x hidden) against ``targets``.

    A frozen bias-free linear head (the LoRA case) takes the fused path: Liger's kernel on CUDA when
    installed, else the chunked function above. Any other head (trained, biased, scaled or soft-capped logits)
    runs chunk by chunk under activation checkpointing, which also keeps only one chunk's logits alive.
    """
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    scale = getattr(lm.config, "logit_scale", None)
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    plain = (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
             and scale is None and softcap is None)
    if plain and hidden.is_cuda and (liger := _liger_loss()) is not None:
        return liger(head.weight, hidden, targets)
    if plain:
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, h, t, scale, softcap,
                                                              use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, scale, softcap)
    return total
