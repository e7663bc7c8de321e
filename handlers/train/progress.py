"""Progress logs: CPU/RAM through psutil, per-GPU numbers through NVML (``daemon.gpus``).

Every ``progress_log.interval_seconds`` a snapshot goes to ``progress_logs/progress_<UTC>.json`` and the
rolling ``progress_summary.json``. GPU fields are null (and ``gpus`` empty) where no NVIDIA GPU is present.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import psutil

from daemon.gpus import gpu_readings
from handlers.diskspace import best_effort
from handlers.train.metrics import utc_stamp
from trainbox.fsio import read_json, write_json_atomically

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress_logs"
SUMMARY = "progress_summary.json"
SUMMARY_WINDOW = 20
TRAINING_FIELDS = ("epoch", "step", "total_steps", "loss", "learning_rate", "samples_per_s", "tokens_per_s", "eta_s")


def nvml_index(device: str) -> int:
    """NVML numbers every GPU of the machine; torch's cuda:N counts only CUDA_VISIBLE_DEVICES (the daemon sets it)."""
    local = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and local < len(visible):
        return int(visible[local])
    return local


def system_snapshot(device: str) -> dict[str, Any]:
    """CPU %, RAM %, process RSS and GPU readings; ``gpu_*`` describe the training device (null on CPU)."""
    gpus = gpu_readings()
    index = nvml_index(device)
    mine = gpus[index] if device.startswith("cuda") and index < len(gpus) else None
    return {"cpu_percent": psutil.cpu_percent(interval=None), "ram_percent": psutil.virtual_memory().percent,
            "process_rss_mib": round(psutil.Process().memory_info().rss / 2**20), "gpus": gpus,
            "gpu_utilization_percent": mine and mine["utilization_percent"],
            "gpu_memory_used_mib": mine and mine["memory_used_mib"],
            "gpu_memory_total_mib": mine and mine["memory_total_mib"],
            "gpu_temperature_c": mine and mine["temperature_c"]}


def write_progress_log(stage_dir: Path, record: dict[str, Any]) -> Path | None:
    """One timestamped progress file and the rolling summary; None (skipped) while the disk is full."""
    return best_effort("progress log", lambda: _write_progress_log(stage_dir, record))


def _write_progress_log(stage_dir: Path, record: dict[str, Any]) -> Path:
    now = time.time()
    record = {"time": now, "utc": utc_stamp(now), **record}
    millis = f"{int(now * 1000) % 1000:03d}"  # several logs a second when the interval is short
    path = stage_dir / PROGRESS_DIR / f"progress_{record['utc'][:-1]}.{millis}Z.json"
    write_json_atomically(path, record)
    summary = read_json(stage_dir / SUMMARY, default={}) or {}
    recent = (summary.get("recent") or [])[-(SUMMARY_WINDOW - 1):] + [record]
    write_json_atomically(stage_dir / SUMMARY, {"latest": record, "recent": recent,
                                                "logs_written": int(summary.get("logs_written", 0)) + 1,
                                                "last_log": path.name, **record})
    return path
