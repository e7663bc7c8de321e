"""Checks of a job against this machine, run at ingest (torch-free), so a job that cannot run is
rejected with the fix before anything starts. The stage-specific rules live with their stages."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from daemon.errors import Problem
from daemon.jobspec import JobSpec
from handlers.export.support import check_export_requirements
from handlers.registry import STAGES
from handlers.train.requirements import check_train_requirements

_KEY_PREFIX = re.compile(r"^((?:train|export|evaluate)\.[a-z_.]+): ")


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
    if "train" in spec.stages:
        problems += [_problem(msg, "train") for msg in check_train_requirements(spec.train, gpu_count > 0)]
        if spec.train.method == "qlora" and gpu_count and importlib.util.find_spec("bitsandbytes") is None:
            problems.append(Problem("QLoRA needs bitsandbytes, which is not installed", key="train.method",
                                    fix="pip install 'trainbox[gpu]'"))
    if "export" in spec.stages:
        problems += _export_problems(spec)
    return problems


def _problem(message: str, default_key: str) -> Problem:
    """A stage check's message as a Problem whose key locates the line in the job file."""
    match = _KEY_PREFIX.match(message)
    if match:
        return Problem(message[match.end():], key=match.group(1))
    return Problem(message, key=default_key)


def _export_problems(spec: JobSpec) -> list[Problem]:
    config = Path(spec.base_model) / "config.json"
    if not config.is_file():
        return []  # builtin:tiny is a Llama; hub ids are checked when the export stage loads them
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [Problem(f"cannot read {config}: {exc}", key="base_model",
                        fix="point base_model at a complete Hugging Face model folder")]
    return [_problem(msg, "export.gguf") for msg in check_export_requirements(data, spec.export)]
