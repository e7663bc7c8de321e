"""Which base models the export stage can turn into GGUF (torch-free: the daemon calls this at ingest)."""
from __future__ import annotations

from typing import Any

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


def architecture_of(config: dict[str, Any]) -> str | None:
    """The HF architecture class a config.json describes (``architectures[0]``, else via ``model_type``)."""
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = config.get("model_type")
    return MODEL_TYPES.get(str(model_type)) if model_type else None


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def _modelfile_problems(spec: Any) -> list[str]:
    """export.ollama.system goes into the Modelfile verbatim: refuse what Ollama would not read back as written."""
    from handlers.export.ollama import UnsafeModelfileValue, quoted

    system = getattr(getattr(spec, "ollama", None), "system", None)
    if not system:
        return []
    try:
        quoted(system, "export.ollama.system", triple=True)
    except UnsafeModelfileValue as exc:
        return [f"export.ollama.system: {str(exc).removeprefix('export.ollama.system ')}"]
    return []


def check_export_requirements(model_config_json: dict[str, Any] | None, spec: Any) -> list[str]:
    """Problems that would make the export stage fail for this base model and ``ExportSpec`` (empty: fine).

    ``model_config_json`` is the base model's config.json (None when unknown, e.g. a hub id: nothing to check).
    """
    if not getattr(spec, "gguf", None):
        return []
    problems = _modelfile_problems(spec)
    if model_config_json is None:
        return problems
    arch = architecture_of(model_config_json)
    if arch is None:
        problems.append("the base model's config.json names no architecture; GGUF export supports "
                        f"{supported_list()} (or set export.gguf: [] to export the merged model only)")
    elif arch not in SUPPORTED_ARCHITECTURES:
        problems.append(f"GGUF export does not support {arch}; supported: {supported_list()}. "
                        "Use a base model of a supported architecture or set export.gguf: [] to skip GGUF")
    rope = model_config_json.get("rope_scaling") or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "")) or "").lower()
    if arch == "Phi3ForCausalLM" and rope_type and rope_type not in (*GGUF_LONGROPE_TYPES, "default"):
        problems.append(f"Phi-3 rope_scaling type {rope_type!r} cannot be written to GGUF (longrope only)")
    heads = model_config_json.get("num_attention_heads")
    hidden = model_config_json.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads and hidden % heads:
        problems.append(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return problems
