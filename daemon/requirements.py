"""Checks of a job against this machine, run at ingest (torch-free), so a job that cannot run is
rejected with the fix before anything starts. The stage-specific rules live with their stages."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from handlers.export.support import architecture_of, check_export_requirements
from handlers.train.requirements import check_train_requirements
from trainbox.errors import Problem
from trainbox.jobspec import JobSpec
from trainbox.stages import STAGES

BASE_MODEL_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
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
    base_problems, base_config = check_base_model_folder(spec.base_model)
    problems += base_problems
    if "export" in spec.stages:
        problems += [_problem(msg, "export.gguf") for msg in check_export_requirements(base_config, spec.export)]
    return problems


def _problem(message: str, default_key: str) -> Problem:
    """A stage check's message as a Problem whose key locates the line in the job file."""
    match = _KEY_PREFIX.match(message)
    if match:
        return Problem(message[match.end():], key=match.group(1))
    return Problem(message, key=default_key)


def _read_json(path: Path) -> tuple[Any, Problem | None]:
    """A JSON file of the base model folder, or the problem naming its line and column."""
    fix = ("repair or re-download that file (save the model with save_pretrained), or point base_model at "
           "another folder")
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except json.JSONDecodeError as exc:
        return None, Problem(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                             key="base_model", fix=fix)
    except UnicodeDecodeError as exc:
        return None, Problem(f"{path}: not UTF-8 text (byte {exc.start})", key="base_model", fix=fix)
    except OSError as exc:
        return None, Problem(f"{path}: cannot be read ({exc.strerror})", key="base_model", fix=fix)


def check_base_model_folder(base_model: str) -> tuple[list[Problem], dict[str, Any] | None]:
    """Problems of a local base model folder found without loading it (json only: the daemon stays torch-free):
    config.json and the tokenizer files parse, a tokenizer is there, the config names a causal LM. Also the
    parsed config.json (None when unusable). A hub id or builtin:tiny has no folder: checked when loaded."""
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return [], None
    problems: list[Problem] = []
    parsed: dict[str, Any] = {}
    for name in BASE_MODEL_JSON:
        if (folder / name).is_file():
            parsed[name], problem = _read_json(folder / name)
            problems += [problem] if problem else []
    if not (folder / "config.json").is_file():
        problems.append(Problem(f"{folder} has no config.json", key="base_model",
                                fix="point base_model at a folder saved with save_pretrained (model and tokenizer)"))
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        problems.append(Problem(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)", key="base_model",
                                fix="save the tokenizer into the same folder (tokenizer.save_pretrained)"))
    config = parsed.get("config.json")
    if not isinstance(config, dict):
        return problems, None
    arch = architecture_of(config)
    if arch is None:
        problems.append(Problem(f"{folder / 'config.json'} names no architecture (no \"architectures\" and no "
                                "known \"model_type\")", key="base_model",
                                fix="use a folder saved by transformers' save_pretrained"))
    elif not arch.endswith("ForCausalLM") and not arch.endswith("LMHeadModel"):
        problems.append(Problem(f"{folder / 'config.json'}: {arch} is not a causal language model", key="base_model",
                                fix="fine-tune a decoder-only model (e.g. Phi-3, Qwen2, Llama, Mistral)"))
    return problems, config
