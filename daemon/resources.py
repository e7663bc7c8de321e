"""Machine-health warnings: GPU temperature, RAM, sustained CPU load, free disk.

One rule set for both places that watch: the training process (CPU/RAM/GPU while it trains, with the job's
context) and the daemon (free disk always; CPU/RAM/GPU while no training stage is running). Readings come
in as a snapshot dict, so the rules are testable without a busy machine. Torch-free.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from daemon.gpus import gpu_readings

log = logging.getLogger(__name__)
DEFAULT_LIMITS = {"gpu_temp_c": 75.0, "ram_percent": 95.0, "cpu_percent": 90.0, "cpu_sustained_seconds": 120.0,
                  "min_free_disk_gb": 5.0}
WARNING_REPEAT_SECONDS = 600.0  # the same warning at most every 10 minutes


class ResourceWatch:
    """Turns snapshots into rate-limited ``resource_warning`` events (limits from the daemon's settings)."""

    def __init__(self, settings: dict[str, Any], emit: Callable[..., None],
                 repeat_seconds: float = WARNING_REPEAT_SECONDS):
        self.limits = {k: float(settings.get(k, v)) for k, v in DEFAULT_LIMITS.items()}
        self.emit, self.repeat_seconds = emit, repeat_seconds
        self._last_sent: dict[str, float] = {}
        self._cpu_high_since: float | None = None

    def check(self, snap: dict[str, Any], now: float | None = None) -> list[str]:
        """Emit the warnings that ``snap`` calls for and that were not sent recently; return their keys.

        Keys missing from ``snap`` are not checked (the daemon leaves CPU/RAM/GPU to a running train stage).
        """
        now = time.monotonic() if now is None else now
        found: list[tuple[str, str, dict[str, Any]]] = []
        for gpu in snap.get("gpus") or []:
            if gpu["temperature_c"] is not None and gpu["temperature_c"] > self.limits["gpu_temp_c"]:
                found.append((f"gpu{gpu['index']}_temp", f"GPU {gpu['index']} is at {gpu['temperature_c']} C "
                              f"(limit {self.limits['gpu_temp_c']:g} C); check cooling and airflow",
                              {"gpu": gpu["index"], "value": gpu["temperature_c"]}))
        if snap.get("ram_percent") is not None and snap["ram_percent"] > self.limits["ram_percent"]:
            found.append(("ram", f"RAM use is {snap['ram_percent']:.0f}% (limit {self.limits['ram_percent']:g}%); "
                          "close other programs or lower train.batch_size", {"value": snap["ram_percent"]}))
        if snap.get("cpu_percent") is not None and snap["cpu_percent"] > self.limits["cpu_percent"]:
            self._cpu_high_since = self._cpu_high_since if self._cpu_high_since is not None else now
            if now - self._cpu_high_since >= self.limits["cpu_sustained_seconds"]:
                found.append(("cpu", f"CPU has been above {self.limits['cpu_percent']:g}% for "
                              f"{now - self._cpu_high_since:.0f} s", {"value": snap["cpu_percent"]}))
        else:
            self._cpu_high_since = None
        if snap.get("disk_free_gb") is not None and snap["disk_free_gb"] < self.limits["min_free_disk_gb"]:
            found.append(("disk", f"only {snap['disk_free_gb']:.1f} GB free on {snap.get('disk_path')} "
                          "(checkpoints need room)", {"value": snap["disk_free_gb"]}))
        sent = []
        for key, message, data in found:
            if now - self._last_sent.get(key, -1e18) >= self.repeat_seconds:
                self._last_sent[key] = now
                log.warning("resource warning: %s", message)
                self.emit("resource_warning", message, resource=key, **data)
                sent.append(key)
        return sent


def daemon_snapshot(home: Path, machine: bool) -> dict[str, Any]:
    """Free disk of the home; with ``machine`` also CPU %, RAM % and GPU readings."""
    snap: dict[str, Any] = {"disk_free_gb": shutil.disk_usage(home).free / 1e9, "disk_path": str(home)}
    if machine:
        snap.update(cpu_percent=psutil.cpu_percent(interval=None), ram_percent=psutil.virtual_memory().percent,
                    gpus=gpu_readings())
    return snap
