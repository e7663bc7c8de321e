"""Every drop-time rule: what makes a job impossible on this machine, as ``Problem``s (key, message, fix).

Torch-free and json-only, so the daemon runs it at ingest and a stage runs the same rules before it starts
work; a job that cannot run is rejected with the fix before anything starts.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from trainbox.errors import Problem
from trainbox.jobspec import ExportSpec, JobSpec, TrainSpec
from trainbox.stages import STAGES

BASE_MODEL_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
# HF architecture class -> llama.cpp architecture name written as general.architecture
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
}
# model_type in config.json -> architecture class, for configs that lack "architectures"
MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}
GGUF_LONGROPE_TYPES = ("longrope", "su")
SKIP_GGUF = "set export.gguf: [] to export the merged model only"


def check_job(spec: JobSpec, gpu_count: int) -> list[Problem]:
    """Problems that make ``spec`` impossible on this machine (empty list: it can run)."""
    problems: list[Problem] = []
    missing = [s for s in spec.stages if s not in STAGES]
    if missing:
        problems.append(Problem(f"stage(s) {', '.join(missing)} are not available in this trainbox version",
                                key="stages", fix=f"use only: {', '.join(STAGES)}"))
    if spec.kind == "sweep" and spec.sweep is not None:
        problems += sweep_problems(spec, gpu_count)
    if "train" in spec.stages:
        problems += train_problems(spec.train, cuda_available=gpu_count > 0)
        problems += distributed_problems(spec.train, gpu_count)
        later = [s for s in spec.stages if s in ("evaluate", "export")]
        if spec.train.distributed.node_rank > 0 and later:
            problems.append(Problem(f"node_rank {spec.train.distributed.node_rank} trains alongside node 0, which "
                                    f"alone writes the adapter, so {', '.join(later)} would have no model here",
                                    key="stages", fix="on machines other than node 0 set stages: [prepare, train]"))
        if spec.train.method == "qlora" and gpu_count and importlib.util.find_spec("bitsandbytes") is None:
            problems.append(Problem("QLoRA needs bitsandbytes, which is not installed", key="train.method",
                                    fix="pip install 'trainbox[gpu]'"))
    base_problems, base_config = check_base_model_folder(spec.base_model)
    problems += base_problems
    if "export" in spec.stages:
        problems += export_problems(base_config, spec.export)
    return problems


def sweep_problems(spec: JobSpec, gpu_count: int) -> list[Problem]:
    """A sweep whose trials could not run as written: unknown keys, values the schema or this machine refuses
    (each bound and choice is checked as a trial job), a grid smaller than ``trials``, an export that would never
    run, a storage driver that is missing."""
    from pydantic import ValidationError

    from trainbox.study import apply_params, grid_size, param_path_problem

    sweep, problems = spec.sweep, []
    as_is = {p.sentence() for p in check_job(apply_params(spec, {}), gpu_count)}
    for key, param in sweep.params.items():
        reason = param_path_problem(key)
        if reason:
            problems.append(Problem(reason, key=f"sweep.params.{key}", fix="name a key of the job, e.g. "
                                    "train.learning_rate, train.lora.r or train.warmup_ratio"))
            continue
        values = param.choices if param.type == "categorical" else [param.low, param.high]
        if param.type == "int":
            values = [int(v) for v in values]
        for value in values:
            try:
                trial = apply_params(spec, {key: value})
            except ValidationError as exc:
                problems.append(Problem(f"the value {value!r} is not valid for {key}: {exc.errors()[0]['msg']}",
                                        key=f"sweep.params.{key}", fix="keep the search space inside what the "
                                        "key accepts (see docs/jobs.md)"))
                break
            new = [p for p in check_job(trial, gpu_count) if p.sentence() not in as_is]
            if new:  # e.g. train.method: qlora on a machine without CUDA, or loss weights
                problems += [Problem(f"a trial with {key}={value!r} could not run: {p.message}",
                                     key=f"sweep.params.{key}", fix=p.fix) for p in new]
                break
    size = grid_size(sweep) if not problems and sweep.sampler == "grid" else None
    if size is not None and sweep.method == "optuna" and size < sweep.trial_count:
        problems.append(Problem(f"the grid has {size} points but trials is {sweep.trial_count}",
                                key="sweep.trials", fix=f"set trials: {size} or widen the grid"))
    if "train" not in spec.stages:
        problems.append(Problem("a sweep trains one model per trial, but stages has no train", key="stages",
                                fix="add train (and evaluate) to stages"))
    if "export" in spec.stages and sweep.then != "train_best":
        problems.append(Problem("trials are not exported; export runs after the sweep only with then: train_best",
                                key="stages", fix="set sweep.then: train_best, or remove export from stages"))
    if (sweep.storage or "").startswith(("postgresql://", "postgresql+psycopg2://")) and \
            importlib.util.find_spec("psycopg2") is None:
        problems.append(Problem("a postgresql:// storage needs the psycopg2 driver, which is not installed",
                                key="sweep.storage", fix="pip install 'trainbox[postgres]'"))
    elif sweep.storage and not sweep.storage.startswith(("sqlite:///", "postgresql")):
        problems.append(Problem(f"{sweep.storage.split(':')[0]!r} storage is not supported", key="sweep.storage",
                                fix="use sqlite:///path/optuna.db or postgresql://user@host:port/db"))
    return problems


def train_problems(spec: TrainSpec, cuda_available: bool) -> list[Problem]:
    """Train settings this machine cannot run (the daemon at ingest, the train stage once it knows its device)."""
    problems: list[Problem] = []
    if spec.method == "qlora" and not cuda_available:
        problems.append(Problem(
            f"qlora needs an NVIDIA GPU with CUDA (bitsandbytes {spec.bits}-bit quantization) and none was found "
            "on this machine", key="train.method",
            fix="set train.method: lora (or auto, which uses LoRA here), or run the job on a machine with a CUDA GPU"))
    if spec.device.startswith("cuda") and not cuda_available:
        problems.append(Problem(f"{spec.device} but no CUDA GPU was found", key="train.device",
                                fix="set train.device: auto or cpu"))
    if spec.precision == "fp16" and not cuda_available:
        problems.append(Problem("fp16 needs a CUDA GPU (half precision training is unstable on CPU)",
                                key="train.precision", fix="set train.precision: auto (fp32 on CPU) or bf16"))
    return problems


def distributed_problems(spec: TrainSpec, gpu_count: int) -> list[Problem]:
    """``train.distributed`` settings this machine cannot run (empty when training runs in one process)."""
    dist, problems = spec.distributed, []
    if dist.strategy == "fsdp" and spec.method == "qlora":
        problems.append(Problem(
            "fsdp cannot shard QLoRA's 4-bit weights in this trainbox version (bitsandbytes' packed 4-bit "
            "parameters are not split by torch's fully_shard here)", key="train.distributed.strategy",
            fix="use method: lora with strategy: fsdp (the bf16 weights are sharded), or strategy: ddp with "
                "method: qlora (every GPU holds a 4-bit copy); see docs/distributed.md"))
    if not dist.enabled:
        if dist.strategy == "fsdp":
            problems.append(Problem("strategy: fsdp shards the model over several processes, but this job trains "
                                    "in one", key="train.distributed.strategy",
                                    fix="set train.distributed.devices to 2 or more (or all), or remove strategy"))
        return problems
    if spec.device == "cpu":
        if dist.devices == "all":
            problems.append(Problem("devices: all counts GPUs, but train.device is cpu",
                                    key="train.distributed.devices",
                                    fix="give a number of CPU processes (e.g. devices: 2) or set train.device: auto"))
        return problems
    if spec.device.startswith("cuda:"):
        problems.append(Problem(f"train.device {spec.device} pins one GPU, but distributed training uses one GPU "
                                "per process", key="train.device",
                                fix="set train.device: cuda (or auto) and choose the number with distributed.devices"))
    wanted = gpu_count if dist.devices == "all" else dist.devices
    if gpu_count == 0 or wanted > gpu_count:
        problems.append(Problem(
            f"devices: {dist.devices} needs {wanted or 'at least one'} GPU(s) on this machine and "
            f"{gpu_count} {'was' if gpu_count == 1 else 'were'} found", key="train.distributed.devices",
            fix=f"set devices to at most {gpu_count}" if gpu_count else
            "run on a machine with GPUs, or set train.device: cpu to train with CPU processes (gloo)"))
    return problems


def architecture_of(config: dict[str, Any]) -> str | None:
    """The HF architecture class a config.json describes (``architectures[0]``, else via ``model_type``)."""
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = config.get("model_type")
    return MODEL_TYPES.get(str(model_type)) if model_type else None


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def modelfile_unprintable(value: str) -> list[str]:
    """Characters Ollama's parser silently drops (Go's strconv.IsPrint is false; newlines and tabs are kept)."""
    return sorted({f"U+{ord(c):04X}" for c in value if not (c.isprintable() or c in "\n\r\t")})


def modelfile_value_problem(value: str, key: str) -> Problem | None:
    """Why ``value`` cannot be one Modelfile argument that Ollama reads back as written (None: it can).

    The Modelfile has no escapes: a triple quote would end the value, unprintable characters vanish."""
    bad = modelfile_unprintable(value)
    if bad:
        return Problem(f"contains characters that an Ollama Modelfile cannot hold ({', '.join(bad)}, which ollama "
                       "create would silently drop)", key=key, fix="remove them")
    if '"""' in value:
        return Problem('contains """, which would end its quoted value in the Modelfile and turn the rest into '
                       "Modelfile instructions", key=key, fix="remove or rephrase it")
    return None


def export_problems(model_config_json: dict[str, Any] | None, spec: ExportSpec) -> list[Problem]:
    """Problems that would make the export stage fail for this base model and ``spec`` (empty: fine).

    ``model_config_json`` is the base model's config.json (None when unknown, e.g. a hub id: nothing to check).
    """
    if not spec.gguf:
        return []
    system = modelfile_value_problem(spec.ollama.system, "export.ollama.system") if spec.ollama.system else None
    problems = [system] if system else []
    if model_config_json is None:
        return problems
    arch = architecture_of(model_config_json)
    if arch is None:
        problems.append(Problem(f"the base model's config.json names no architecture; GGUF export supports "
                                f"{supported_list()}", key="export.gguf", fix=SKIP_GGUF))
    elif arch not in SUPPORTED_ARCHITECTURES:
        problems.append(Problem(f"GGUF export does not support {arch}; supported: {supported_list()}",
                                key="export.gguf", fix="use a base model of a supported architecture or "
                                                       "set export.gguf: [] to skip GGUF"))
    rope = model_config_json.get("rope_scaling") or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "")) or "").lower()
    if arch == "Phi3ForCausalLM" and rope_type and rope_type not in (*GGUF_LONGROPE_TYPES, "default"):
        problems.append(Problem(f"Phi-3 rope_scaling type {rope_type!r} cannot be written to GGUF (longrope only)",
                                key="export.gguf", fix=SKIP_GGUF))
    heads = model_config_json.get("num_attention_heads")
    hidden = model_config_json.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads and hidden % heads:
        problems.append(Problem(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}",
                                key="export.gguf", fix=SKIP_GGUF))
    return problems


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
