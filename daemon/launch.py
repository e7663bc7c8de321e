"""The command line that starts a stage: ``python -m handlers STAGE DIR``, or torchrun for distributed training.

Torch-free (the daemon builds the command, the child imports torch). torchrun rather than accelerate's
launcher: it is part of torch (nothing more to install), DDP needs no more than its environment variables,
it forwards SIGTERM to every rank and waits ``--shutdown-timeout`` for them, and its static rendezvous
numbers the ranks by ``node_rank``, so node 0 always holds rank 0, the one that writes checkpoints.
"""
from __future__ import annotations

import sys
from pathlib import Path

from trainbox.jobspec import DistributedSpec, TrainSpec


def is_distributed(stage: str, train: TrainSpec) -> bool:
    """Whether ``stage`` runs as several processes (only the train stage does)."""
    return stage == "train" and train.distributed.enabled


def gpu_slots_wanted(stage: str, train: TrainSpec, gpu_slots: int) -> int:
    """GPU slots a stage on a GPU reserves: one per rank for the distributed train stage (``all``: every
    one the daemon manages), else one."""
    if not is_distributed(stage, train):
        return 1
    devices = train.distributed.devices
    return gpu_slots if devices == "all" else int(devices)


def ranks_here(train: TrainSpec, slots: list[str]) -> int:
    """Ranks to start on this machine: one per reserved GPU, or ``devices`` CPU processes on the CPU slot."""
    if slots == ["cpu"]:
        devices = train.distributed.devices
        return int(devices) if devices != "all" else 1
    return len(slots)


def torchrun_args(dist: DistributedSpec, processes: int, run_id: str, shutdown_seconds: float) -> list[str]:
    """torchrun's options: ``processes`` ranks here; one machine rendezvous on a free local port. ``run_id``
    (the job name unless ``rdzv_id`` is set) must be the same on every machine of the run."""
    args = [f"--nproc-per-node={processes}", "--max-restarts=0", f"--shutdown-timeout={max(int(shutdown_seconds), 1)}",
            "--monitor-interval=0.5"]
    if dist.nnodes == 1:
        return [*args, "--standalone"]
    return [*args, f"--nnodes={dist.nnodes}", f"--node-rank={dist.node_rank}", "--rdzv-backend=static",
            f"--rdzv-endpoint={dist.rdzv_endpoint}", f"--rdzv-id={dist.rdzv_id or run_id}"]


def stage_command(stage: str, stage_dir: Path, train: TrainSpec, processes: int, run_id: str,
                  shutdown_seconds: float) -> list[str]:
    """argv of a stage's child process; ``processes`` ranks on this machine when it is distributed."""
    stage_args = ["-m", "handlers", stage, str(stage_dir)]
    if not is_distributed(stage, train):
        return [sys.executable, *stage_args]
    return [sys.executable, "-m", "handlers.torchrun",
            *torchrun_args(train.distributed, processes, run_id, shutdown_seconds), *stage_args]
