"""``strategy: fsdp``: the model's weights sharded over the ranks with torch's ``fully_shard`` (FSDP2).

Each decoder block is its own FSDP unit (gathered for its forward and backward, then freed) and the rest
(embeddings, final norm, head) belongs to the root, a ``ModelCall`` around the PEFT model, so the loss code
that reaches into the decoder and the head runs inside one root forward. The frozen base weights are sharded
as well as the LoRA weights and the optimizer state, so every rank holds about 1/N of the model.

The model is built and a checkpoint is loaded in one piece, as for DDP, and only then sharded: the optimizer
keeps its object (the scheduler holds it) and is pointed at the sharded parameters, its resumed state split
the same way. A checkpoint gathers the full LoRA weights and optimizer state on rank 0 and writes them in the
format of a one-process checkpoint, so FSDP, DDP and one process resume each other's checkpoints with any
number of ranks.
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from handlers.train.distributed import ModelCall, World

log = logging.getLogger(__name__)


class ShardedModelCall(ModelCall):
    """The FSDP root. ``no_sync`` matches DDP's: gradients are reduced only by the last micro-batch's backward."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)


@dataclass
class Gathered:
    """A checkpoint's tensors, whole, on rank 0: the trainable weights (PEFT names) and the optimizer state."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def _blocks(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers names in ``_no_split_modules`` (decoder layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _precision(model: Any) -> Any:
    """Mixed precision when the weights differ in dtype (a bf16 base with float32 LoRA weights): FSDP gathers
    one dtype per unit, so compute runs in the base's dtype and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) <= 1:
        return MixedPrecisionPolicy()
    compute = min(dtypes, key=lambda d: torch.finfo(d).bits)
    log.info("FSDP computes in %s (weights in %s) and reduces gradients in float32", compute,
             ", ".join(sorted(str(d) for d in dtypes)))
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard(model: Any, optimizer: torch.optim.Optimizer, world: World, device: str) -> ShardedModelCall:
    """Shard ``model`` over the ranks and move ``optimizer`` (and any resumed state) onto the shards.

    Call it after the checkpoint is loaded; call the returned root as ``root(fn, *args)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # named, not FSDP's default: CPU ranks (gloo) on a machine that also has GPUs would get a CUDA mesh
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
    names = {id(p): n for n, p in model.named_parameters()}
    before = [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]
    root = ShardedModelCall(model)
    precision = _precision(model)
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(root, mesh=mesh, mp_policy=precision)
    after = dict(model.named_parameters())
    state: dict[Any, dict[str, Any]] = defaultdict(dict)
    for name, old in before:
        if old in optimizer.state:
            state[after[name]] = {k: _shard_like(v, after[name]) for k, v in optimizer.state[old].items()}
    for group in optimizer.param_groups:
        group["params"] = [after[names[id(p)]] for p in group["params"]]
    optimizer.state = state
    log.info("FSDP: %d decoder blocks and the root sharded over %d ranks", len(blocks), world.size)
    return root


def _shard_like(value: Any, param: Any) -> Any:
    """A resumed optimizer tensor split like its parameter (Adam's moments); anything else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def _whole(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    return value.cpu() if torch.is_tensor(value) else value


def gather(model: Any, optimizer: torch.optim.Optimizer | None, world: World) -> Gathered | None:
    """The whole trainable weights and (unless ``optimizer`` is None) optimizer state on rank 0, None on the
    others. Every rank must call it at the same point: each tensor is one collective."""
    adapter = {n: _whole(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
    states, groups = {}, []
    if optimizer is not None:
        saved = optimizer.state_dict()
        groups = saved["param_groups"]
        states = {index: {key: _whole(v) for key, v in sorted(values.items())}
                  for index, values in sorted(saved["state"].items())}
    if not world.is_main:
        return None
    return Gathered(adapter, {"state": states, "param_groups": groups})


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a number (over sharded gradients it is a DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
