"""Data parallelism for the train stage when torchrun started it: one process per device, DDP over them.

Every rank builds the same model and walks the same seeded data order; a step's rows are split between the
ranks (``StepBatches(rank=, world=)``) and every loss is divided by the step's global label-token count, so the
averaged gradients, the step count and the per-step loss are those of one process with the same global batch
(up to the order of floating-point sums). Only rank 0 writes checkpoints, metrics and progress; the other
ranks follow. Decisions that change what happens next (stop now) are agreed through one all_reduce, so every
rank stops at the same step boundary.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainbox.errors import StageFailed

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # rank 0 writing a large checkpoint keeps the others waiting this long


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The rank layout torchrun puts in the environment (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK)."""
    env = os.environ
    return World(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                 size=int(env.get("WORLD_SIZE", 1)), node_rank=int(env.get("GROUP_RANK", 0)))


def rank_device(device: str, world: World) -> str:
    """This rank's device: its own GPU (``cuda:LOCAL_RANK`` among the ones the daemon made visible), or the CPU."""
    if world.enabled and device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    return device


def start(world: World, device: str) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if not world.enabled:
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=torch.device(device) if backend == "nccl" else None)
    log.info("rank %d of %d (node %d, local rank %d) joined the %s process group on %s, host %s", world.rank,
             world.size, world.node_rank, world.local_rank, backend, device, socket.gethostname())


def stop(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def lost_rank(what: str, exc: BaseException) -> StageFailed:
    """The failure a collective raises when a peer rank died (killed, crashed), said plainly."""
    return StageFailed(f"lost contact with another rank while {what} ({str(exc).splitlines()[0][:200]}); a rank "
                       "crashed or was killed (torchrun's summary in the log names it). Nothing after the newest "
                       "checkpoint is kept: 'trainbox retry JOB' resumes from it")


def _communicate(what: str, call: Any) -> Any:
    try:
        return call()
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError subclasses when a peer is gone
        raise lost_rank(what, exc) from exc


def agree(world: World, flag: bool, device: str) -> bool:
    """True on every rank when ``flag`` is true on any rank (the same answer everywhere)."""
    if not world.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    _communicate("agreeing on a stop", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return bool(value.item())


def sum_over_ranks(world: World, values: list[float], device: str) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64, so token counts stay exact)."""
    if not world.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    _communicate("summing the step's loss", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor.tolist()


def wait_for_all(world: World, what: str) -> None:
    if world.enabled:
        _communicate(what, dist.barrier)


def local_first(world: World, what: str, call: Any) -> Any:
    """``call()`` on the first rank of each machine, then on the others: a cache it fills (the builtin model,
    a hub download) is written once, never by several ranks at the same time."""
    result = call() if world.local_rank == 0 else None
    wait_for_all(world, what)
    return result if world.local_rank == 0 else call()


def share_from_main(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (CPU tensors inside are fine; any machine, no shared disk needed)."""
    if not world.enabled:
        return obj
    box = [obj if world.is_main else None]
    _communicate("receiving rank 0's checkpoint", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def seed_step(seed: int, step: int, world: World) -> None:
    """Dropout masks per (seed, step, rank): resuming needs no RNG state from other ranks, with any rank count."""
    if world.enabled:
        torch.manual_seed((seed * 1_000_003 + step) * 1_009 + world.rank)


class ModelCall(torch.nn.Module):
    """Calls ``fn(model, *args)`` as its forward, so DDP's forward runs the loss code (which reaches into the
    model's decoder and head) and DDP's reducer syncs the LoRA gradients of the backward that follows."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, fn: Any, *args: Any) -> Any:
        return fn(self.model, *args)


def wrap(model: Any, world: World, device: str) -> Any:
    """DDP around ``model`` (call it as ``ddp(fn, *args)``); None in one process. DDP averages gradients."""
    if not world.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(ModelCall(model), device_ids=ids)
