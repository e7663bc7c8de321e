"""Progress logs and resource warnings: CPU/RAM through psutil, per-GPU numbers through pynvml.

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

from daemon.fsio import read_json, write_json_atomically
from handlers.train.metrics import utc_stamp

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress_logs"
SUMMARY = "progress_summary.json"
SUMMARY_WINDOW = 20
TRAINING_FIELDS = ("epoch", "step", "total_steps", "loss", "learning_rate", "samples_per_s", "tokens_per_s", "eta_s")


class GpuProbe:
    """pynvml readings for every GPU; an empty list where NVML is missing (no NVIDIA driver)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # NVMLError, ImportError, OSError: every one means "no GPU readings"
            log.debug("no NVML (%s): GPU fields stay null", exc)

    def sample(self) -> list[dict[str, Any]]:
        if self._nvml is None:
            return []
        nv = self._nvml
        gpus = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            name = nv.nvmlDeviceGetName(handle)
            gpus.append({"index": index, "name": name.decode() if isinstance(name, bytes) else name,
                         "utilization_percent": nv.nvmlDeviceGetUtilizationRates(handle).gpu,
                         "memory_used_mb": round(memory.used / 2**20), "memory_total_mb": round(memory.total / 2**20),
                         "temperature_c": nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)})
        return gpus

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None


def nvml_index(device: str) -> int:
    """NVML numbers every GPU of the machine; torch's cuda:N counts only CUDA_VISIBLE_DEVICES (the daemon sets it)."""
    local = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and local < len(visible):
        return int(visible[local])
    return local


def system_snapshot(probe: GpuProbe, device: str) -> dict[str, Any]:
    """CPU %, RAM %, process RSS and GPU readings; ``gpu_*`` describe the training device (null on CPU)."""
    gpus = probe.sample()
    index = nvml_index(device)
    mine = gpus[index] if device.startswith("cuda") and index < len(gpus) else None
    return {"cpu_percent": psutil.cpu_percent(interval=None), "ram_percent": psutil.virtual_memory().percent,
            "process_rss_mb": round(psutil.Process().memory_info().rss / 2**20), "gpus": gpus,
            "gpu_utilization_percent": mine and mine["utilization_percent"],
            "gpu_memory_used_mb": mine and mine["memory_used_mb"],
            "gpu_memory_total_mb": mine and mine["memory_total_mb"],
            "gpu_temperature_c": mine and mine["temperature_c"]}


def write_progress_log(stage_dir: Path, record: dict[str, Any]) -> Path:
    """One timestamped progress file, and the rolling summary (latest record plus a short history)."""
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
