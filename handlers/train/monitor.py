"""Parameter-update monitor: every N steps check that each trainable module got a gradient and changed.

A LoRA module that never changes (a frozen hook, a branch the forward pass skips, a dtype problem) trains
nothing while the loss may still fall; naming it early saves a wasted run.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from handlers.train.fsdp import local

log = logging.getLogger(__name__)


def trainable_modules(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters grouped by the module that owns them (e.g. ``...layers.0.self_attn.q_proj``).
    Under FSDP each rank watches its own shards; a parameter with no elements on this rank is left out."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad and local(param).numel():
            owner = name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0]
            groups.setdefault(owner, []).append((name, param))
    return groups


class UpdateMonitor:
    def __init__(self, model: torch.nn.Module, every_n_steps: int):
        self.every = every_n_steps
        self.groups = trainable_modules(model)
        self._snapshot = self._copy()
        self._grad_seen: dict[str, float] = {}
        self.grad_norms: dict[str, float] = {}
        self.warnings: list[dict[str, Any]] = []
        self.checks = 0

    def _copy(self) -> dict[str, torch.Tensor]:
        # (sum, sum of squares) per parameter: a real optimizer update moves them; no full copy of the weights
        def moments(p: torch.Tensor) -> torch.Tensor:
            values = local(p.detach()).double()
            return torch.stack([values.sum(), values.pow(2).sum()])
        return {m: torch.stack([moments(p) for _n, p in ps]).cpu() for m, ps in self.groups.items()}

    def after_backward(self) -> None:
        """Accumulate per-module gradient norms (call before the optimizer step zeroes them)."""
        modules, norms = [], []
        for module, params in self.groups.items():
            grads = [local(p.grad.detach()).float().pow(2).sum() for _n, p in params if p.grad is not None]
            if grads:
                modules.append(module)
                norms.append(torch.stack(grads).sum().sqrt())
        values = torch.stack(norms).tolist() if norms else []  # one device sync per step
        for module, value in zip(modules, values):
            self._grad_seen[module] = max(self._grad_seen.get(module, 0.0), value)

    def after_step(self, step: int) -> list[dict[str, Any]]:
        """At every ``every_n_steps``-th step compare weights with the last check; return new warnings."""
        if step % self.every:
            return []
        self.checks += 1
        self.grad_norms = dict(self._grad_seen)
        current = self._copy()
        found = []
        for module, before in self._snapshot.items():
            changed = not torch.equal(before, current[module])
            grad = self._grad_seen.get(module, 0.0)
            if grad == 0.0 or not changed:
                problem = "received no gradient" if grad == 0.0 else "received gradients but its weights did not change"
                found.append({"step": step, "module": module, "problem": problem, "grad_norm": grad})
                log.warning("module %s %s in the last %d step(s); it is not learning", module, problem, self.every)
        self._snapshot = current
        self._grad_seen = {}
        self.warnings.extend(found)
        return found

    def summary(self) -> dict[str, Any]:
        stuck = sorted({w["module"] for w in self.warnings})
        return {"every_n_steps": self.every, "checks": self.checks, "trainable_modules": len(self.groups),
                "modules_not_learning": stuck, "warnings": self.warnings[-50:], "last_grad_norms": self.grad_norms}
