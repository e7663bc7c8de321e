"""GPU discovery and readings through NVML (nvidia-ml-py); empty lists where there is no NVIDIA GPU."""
from __future__ import annotations

import logging
from typing import Any

import pynvml

log = logging.getLogger(__name__)
_initialised: bool | None = None


def _init() -> bool:
    global _initialised
    if _initialised is None:
        try:
            pynvml.nvmlInit()
            _initialised = True
        except pynvml.NVMLError as exc:
            log.debug("no NVIDIA GPU visible (%s)", exc)
            _initialised = False
    return _initialised


def gpu_indices() -> list[int]:
    if not _init():
        return []
    return list(range(pynvml.nvmlDeviceGetCount()))


def gpu_readings() -> list[dict[str, Any]]:
    """Utilisation %, memory used/total (MiB) and temperature (C) of every GPU."""
    out = []
    for i in gpu_indices():
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        out.append({
            "index": i,
            "name": name.decode() if isinstance(name, bytes) else name,
            "utilization_percent": util.gpu,
            "memory_used_mib": mem.used // 2**20,
            "memory_total_mib": mem.total // 2**20,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        })
    return out
