"""Per-rank status of a distributed run: each rank writes ``ranks/rank-N.json``; rank 0 puts them in progress.

The files are how ``trainbox top`` and ``show`` get one line per rank (device, step, GPU utilisation where
NVML knows it) without the daemon talking to the ranks. Ranks on other machines write on their machine.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from handlers.diskspace import best_effort
from handlers.train.distributed import World
from handlers.train.progress import system_snapshot
from trainbox.fsio import write_json_atomically

RANKS_DIR = "ranks"
REPORT_SECONDS = 2.0


def rank_record(world: World, device: str, step: int) -> dict[str, Any]:
    snap = system_snapshot(device)
    return {"rank": world.rank, "local_rank": world.local_rank, "node_rank": world.node_rank,
            "host": socket.gethostname(), "pid": os.getpid(), "device": device, "step": step,
            "gpu_utilization_percent": snap["gpu_utilization_percent"],
            "gpu_memory_used_mib": snap["gpu_memory_used_mib"],
            "process_cpu_percent": psutil.Process().cpu_percent(interval=None),
            "process_rss_mib": snap["process_rss_mib"], "time": time.time()}


def read_ranks(stage_dir: Path, world_size: int, since: float) -> list[dict[str, Any]]:
    """The rank files written since ``since`` (this attempt), by rank."""
    found = []
    for rank in range(world_size):
        try:
            record = json.loads((stage_dir / RANKS_DIR / f"rank-{rank}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not written yet, or a rank on another machine
        if record.get("time", 0) >= since:
            found.append(record)
    return found


def reporter(stage_dir: Path, world: World, device: str, system: dict[str, Any]) -> Callable[[int], None]:
    """A per-step callback: every ``REPORT_SECONDS`` write this rank's file; rank 0 also gathers the others'
    into ``system["ranks"]``, which goes into progress.json with the other system readings."""
    started, last = time.time(), [0.0]
    path = stage_dir / RANKS_DIR / f"rank-{world.rank}.json"

    def report(step: int) -> None:
        now = time.monotonic()
        if now - last[0] < REPORT_SECONDS:
            return
        last[0] = now
        best_effort("rank status", lambda: write_json_atomically(path, rank_record(world, device, step)))
        if world.is_main:
            system["ranks"] = read_ranks(stage_dir, world.size, started)

    return report
