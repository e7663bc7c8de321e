"""Checks of a job against this machine, run at ingest (torch-free), so a job that cannot run is
rejected with the fix before anything starts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from daemon.errors import Problem
from daemon.jobspec import JobSpec
from handlers.registry import STAGES

# Architectures the export stage writes as GGUF (keep in step with handlers/export).
GGUF_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"}


def check_job(spec: JobSpec, gpu_count: int) -> list[Problem]:
    """Problems that make ``spec`` impossible on this machine (empty list: it can run)."""
    problems: list[Problem] = []
    missing = [s for s in spec.stages if s not in STAGES]
    if missing:
        problems.append(Problem(f"stage(s) {', '.join(missing)} are not available in this trainbox version",
                                key="stages", fix=f"use only: {', '.join(STAGES)}"))
    if spec.kind == "sweep":
        problems.append(Problem("sweeps are not available in this trainbox version", key="kind",
                                fix="remove 'kind: sweep' and the 'sweep:' section to run one configuration"))
    if spec.train.method == "qlora" and "train" in spec.stages:
        if gpu_count == 0:
            problems.append(Problem("QLoRA needs a CUDA GPU and this machine has none", key="train.method",
                                    fix="use 'method: lora' (runs on the CPU) or 'method: auto'"))
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(Problem("QLoRA needs bitsandbytes, which is not installed", key="train.method",
                                    fix="pip install 'trainbox[gpu]'"))
    if spec.train.device.startswith("cuda") and gpu_count == 0:
        problems.append(Problem(f"device {spec.train.device} requested but this machine has no CUDA GPU",
                                key="train.device", fix="use 'device: auto' or 'device: cpu'"))
    problems += _check_export_architecture(spec)
    return problems


def _check_export_architecture(spec: JobSpec) -> list[Problem]:
    if "export" not in spec.stages or not spec.export.gguf:
        return []
    config = Path(spec.base_model) / "config.json"
    if not config.is_file():
        return []  # builtin:tiny is a Llama; hub ids are checked when the export stage loads them
    try:
        archs = set(json.loads(config.read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, json.JSONDecodeError) as exc:
        return [Problem(f"cannot read {config}: {exc}", key="base_model",
                        fix="point base_model at a complete Hugging Face model folder")]
    if archs and not archs & GGUF_ARCHITECTURES:
        return [Problem(f"GGUF export does not support {', '.join(sorted(archs))}", key="export.gguf",
                        fix=f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}; or set 'gguf: []' "
                            "to export only the merged model")]
    return []
