"""Machine health while jobs run: GPU temperature, RAM, sustained CPU load, free disk; warnings are
rate-limited and go to the notifier."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import psutil

from daemon.config import ResourceSettings
from daemon.gpus import gpu_readings

log = logging.getLogger(__name__)
REPEAT_AFTER_S = 900.0  # the same warning at most every 15 minutes


class ResourceWatch:
    def __init__(self, settings: ResourceSettings, home: Path, notify: Callable[..., None]):
        self.settings = settings
        self.home = home
        self.notify = notify
        self._cpu_high_since: float | None = None
        self._last_sent: dict[str, float] = {}

    def check(self) -> list[str]:
        """Take one reading; return (and send) the warnings that are due."""
        s = self.settings
        warnings: list[tuple[str, str]] = []
        ram = psutil.virtual_memory().percent
        if ram > s.ram_percent:
            warnings.append(("ram", f"RAM at {ram:.0f}% (threshold {s.ram_percent:.0f}%)"))
        cpu = psutil.cpu_percent(interval=None)
        now = time.monotonic()
        if cpu > s.cpu_percent:
            self._cpu_high_since = self._cpu_high_since or now
            if now - self._cpu_high_since >= s.cpu_sustained_seconds:
                warnings.append(("cpu", f"CPU above {s.cpu_percent:.0f}% for {now - self._cpu_high_since:.0f}s"))
        else:
            self._cpu_high_since = None
        free_gb = shutil.disk_usage(self.home).free / 1e9
        if free_gb < s.min_free_disk_gb:
            warnings.append(("disk", f"only {free_gb:.1f} GB free on {self.home} (checkpoints need room)"))
        for gpu in gpu_readings():
            if gpu["temperature_c"] > s.gpu_temp_c:
                warnings.append((f"gpu{gpu['index']}", f"GPU {gpu['index']} at {gpu['temperature_c']} C "
                                                      f"(threshold {s.gpu_temp_c:.0f} C)"))
        sent = []
        for key, message in warnings:
            if now - self._last_sent.get(key, -REPEAT_AFTER_S) >= REPEAT_AFTER_S:
                self._last_sent[key] = now
                log.warning("resource warning: %s", message)
                self.notify("resource_warning", "trainbox resource warning", message)
                sent.append(message)
        return sent
