"""``trainbox top``: a live view of the daemon, its jobs and the GPUs. Reads files only, never writes."""
from __future__ import annotations

from typing import Any

_nvml: Any = None


def gpu_snapshot() -> tuple[list[dict[str, Any]], str | None]:
    """Per-GPU utilisation, memory and temperature via NVML; ``([], reason)`` without a GPU."""
    global _nvml
    try:
        import pynvml
    except ImportError:
        return [], "no GPU (nvidia-ml-py not installed)"
    try:
        if _nvml is None:
            pynvml.nvmlInit()  # once per process: init is slow and refcounted
            _nvml = pynvml
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "util_percent": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                         "mem_used_mb": mem.used / 2**20, "mem_total_mb": mem.total / 2**20,
                         "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)})
    except pynvml.NVMLError as exc:
        return [], f"no GPU ({exc})"
    return gpus, None if gpus else "no GPU"
