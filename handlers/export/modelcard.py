"""The model folder's README.md: what the model is, how it was made and checked, and how to run it."""
from __future__ import annotations

from typing import Any


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "| --- | --- |", *[f"| {a} | {b} |" for a, b in rows]]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(*, name: str, version: int, base_model: str, datasets: list[dict[str, Any]],
               train: dict[str, Any], train_summary: dict[str, Any], evaluation: dict[str, Any] | None,
               ggufs: list[dict[str, Any]], ollama: dict[str, Any], artifacts: dict[str, str],
               withheld: list[dict[str, Any]] | None = None) -> str:
    """Markdown text; every path in it is relative to the model folder, which the daemon moves."""
    lines = [f"# {name} v{version}", "",
             f"A LoRA fine-tune of `{base_model}`, made by trainbox. Folder contents: merged weights in "
             f"`{artifacts.get('merged', 'merged')}/`, the adapter alone in `{artifacts.get('adapter', 'adapter')}/`"
             + (", GGUF files for llama.cpp and Ollama, and a `Modelfile`." if ggufs else "."), "",
             "## Data", ""]
    lines += _table([(d["name"], f"{d.get('rows', '?')} rows, sha256 {str(d.get('sha256', ''))[:12]}")
                     for d in datasets] or [("(none recorded)", "")], ("dataset", "rows"))
    lines += ["", "## Training", ""]
    keys = ("method", "epochs", "max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps",
            "max_seq_length", "precision")
    rows = [(k, _fmt(train[k])) for k in keys if train.get(k) is not None]
    rows += [(f"lora.{k}", _fmt(v)) for k, v in (train.get("lora") or {}).items()]
    rows += [(k, _fmt(v)) for k, v in train_summary.items() if isinstance(v, (int, float, str)) and k != "base_model_path"]
    lines += _table(rows, ("setting", "value"))
    lines += ["", "## Evaluation", ""]
    if evaluation:
        summary = evaluation.get("summary", evaluation)
        lines += _table([(k, _fmt(v)) for k, v in summary.items() if isinstance(v, (int, float, str, bool))],
                        ("metric", "value"))
        if "winner" in summary:
            lines += ["", f"A/B against the base model: {'this model wins' if summary['winner'] else 'no win'}."]
    else:
        lines.append("The job ran no evaluate stage.")
    if ggufs:
        lines += ["", "## GGUF files and their verification", "",
                  "Each file was read back with the gguf reader, loaded with transformers' GGUF loader and "
                  "compared with the merged model on next-token logits; llama.cpp tokenized the rendered chat "
                  "prompts (which must give the training token ids) and decoded greedily from its own tokens.", "",
                  "| file | type | size | max abs logit diff | top-1 agreement | llama.cpp tokens as in training "
                  "| llama.cpp greedy agreement |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for g in ggufs:
            cpp = g.get("llama_cpp") or {}
            lines.append(f"| `{g['file']}` | {g['type']} | {g['size_bytes'] / 1e6:.1f} MB | "
                         f"{_fmt(g.get('max_abs_diff'))} | {_fmt(g.get('top1_agreement'))} | "
                         f"{_fmt(cpp.get('tokenize_matches', 'not run'))} | "
                         f"{_fmt(cpp.get('greedy_token_agreement', 'not run'))} |")
        crashed = [g for g in ggufs if (g.get("llama_cpp") or {}).get("default_kernels_crashed")]
        if crashed:
            lines += ["", "llama.cpp crashed with its default CPU kernels on the exporting machine for these files; "
                      "they were verified with its extra CPU buffer types off (`llama-cli --no-repack`):", ""]
            lines += [f"- `{g['file']}`: {g['llama_cpp']['default_kernels_crashed']}" for g in crashed]
    if withheld:
        lines += ["", "## Files not published", "",
                  "These GGUF types were written but could not be checked in llama.cpp on the exporting machine, "
                  "so they were left out of this folder:", ""]
        lines += [f"- `{g['file']}` ({g['type']}): {g['withheld']}" for g in withheld]
    lines += ["", "## How to run it", ""]
    if ggufs:
        first = ggufs[0]["file"]
        lines += ["Ollama (from this folder):", "", "```sh", f"ollama create {ollama.get('name', name)} -f Modelfile",
                  f"ollama run {ollama.get('name', name)}", "```", "",
                  "llama.cpp:", "", "```sh", f"llama-cli -m {first} -cnv", "```", ""]
    merged = artifacts.get("merged", "merged")
    lines += ["transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tok = AutoTokenizer.from_pretrained("{merged}")',
              f'model = AutoModelForCausalLM.from_pretrained("{merged}")', "```", ""]
    return "\n".join(lines)
