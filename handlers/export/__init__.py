"""Export stage: merge the adapter, write GGUF files, prove they work, write a Modelfile and a model card.

Everything goes to ``<stage_dir>/model/``; the daemon moves that folder to ``models/<name>/v<version>/``,
so every path written inside it is relative.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from handlers import modelio
from handlers.context import StageContext
from handlers.export import merge, modelcard, ollama, verify
from handlers.export.gguf_arch import arch_spec
from handlers.export.gguf_writer import write_gguf
from handlers.export.tokenizer_meta import read_tokenizer_meta
from trainbox.errors import StageFailed, StopRequested
from trainbox.fsio import write_json_atomically
from trainbox.preflight import export_problems
from trainbox.protocol import EvaluateSummary, PrepareSummary, StageResult, TrainSummary

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# verified as rendered chat prompts (multi-turn, non-Latin scripts): special tokens, newlines after them, BOS
CHAT_PROBES = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "请用一句话介绍你自己。日本語でも答えてください。"}],
]


def _skip_reason(ctx: StageContext) -> str | None:
    if not ctx.job.export.only_if_winner:
        return None
    evaluation = ctx.summary_of("evaluate", EvaluateSummary)
    if evaluation is not None and evaluation.winner is True:
        return None
    if evaluation is None or "winner" not in evaluation.model_fields_set:
        return "export.only_if_winner is set but no evaluate result names a winner; nothing exported"
    why = evaluation.winner_reason or "the fine-tuned model did not beat its reference"
    return f"export.only_if_winner is set and the model is not the winner ({why}); nothing exported"


def _verify_prompts(ctx: StageContext, tokenizer: Any, gguf_adds_bos: bool) -> list[Any]:
    """The job's prompts plus rendered chat prompts, so special tokens and BOS handling are checked too."""
    return [*ctx.job.export.verify_prompts, *(verify.chat_probe(tokenizer, m, gguf_adds_bos) for m in CHAT_PROBES)]


def _withhold(entry: dict[str, Any], path: Path, reason: str) -> None:
    """A file llama.cpp could not run here is not published: it is deleted and the reason recorded."""
    path.unlink(missing_ok=True)
    entry["withheld"] = reason
    log.warning("withheld %s: %s", path.name, reason)


def _export_gguf(ctx: StageContext, out: Path, merged_dir: Path, model: Any, tokenizer: Any,
                 base_model_path: str, name: str) -> tuple[list[dict[str, Any]], list[str], list[str], Any]:
    config = json.loads((merged_dir / "config.json").read_text())
    extra = (Path(base_model_path),) if Path(base_model_path).is_dir() else ()
    meta = read_tokenizer_meta(merged_dir, int(config["vocab_size"]), tokenizer, extra_dirs=extra)
    prompts = _verify_prompts(ctx, tokenizer, meta.add_bos)
    rope = (config.get("rope_parameters") or config.get("rope_scaling") or {})
    override = str(rope.get("rope_type", rope.get("type", "default"))) not in ("default", "None")
    results, problems, warnings = [], [], list(meta.warnings)
    for i, out_type in enumerate(ctx.job.export.gguf):
        if ctx.should_stop():
            raise StopRequested("export stopped between GGUF files; it starts over on resume")
        fname = f"{name}-{out_type}.gguf"

        def progress(done: int, total: int, out_type: str = out_type, i: int = i) -> None:
            ctx.report_progress(phase=f"gguf {out_type} ({i + 1}/{len(ctx.job.export.gguf)})", step=done,
                                total_steps=total)

        written = write_gguf(merged_dir, out / fname, out_type, meta, name=name, config=config, on_tensor=progress,
                             base_model=ctx.job.base_model)
        found = verify.read_back(written.path, written.tensors, arch_spec(config).gguf_arch, len(meta.tokens))
        entry: dict[str, Any] = {"file": fname, "type": out_type, "size_bytes": written.size_bytes,
                                 "export_seconds": round(written.seconds, 3), "f16_fallback_tensors": written.fallbacks}
        if found:
            problems += found
        else:
            numbers = verify.compare_with_transformers(out, fname, model, tokenizer, prompts, override)
            entry.update(numbers)
            entry["llama_cpp"] = verify.compare_with_llama_cpp(written.path, model, tokenizer, prompts)
            bad, warn = verify.judge(out_type, numbers, entry["llama_cpp"])
            problems += bad
            warnings += warn
            if entry["llama_cpp"] is not None and "crashed" in entry["llama_cpp"]:
                _withhold(entry, written.path, entry["llama_cpp"]["crashed"])
        results.append(entry)
        log.info("verified %s: %s", fname, {k: v for k, v in entry.items() if k not in ("file",)})
    return results, problems, warnings, meta


def _ollama(ctx: StageContext, out: Path, ggufs: list[dict[str, Any]], tokenizer: Any, meta_eos: str | None,
            add_bos: bool, oname: str) -> tuple[dict[str, Any], list[str]]:
    spec = ctx.job.export.ollama
    chosen = next((g for g in ggufs if g["type"] == "q8_0"), ggufs[0])
    template = getattr(tokenizer, "chat_template", None)
    try:
        t = ollama.translate(lambda msgs, gen: modelio.render_chat(tokenizer, msgs, add_generation_prompt=gen),
                             template if isinstance(template, str) else None, tokenizer.bos_token, add_bos)
    except ValueError as exc:
        raise StageFailed(f"cannot translate the chat template into an Ollama TEMPLATE: {exc}") from exc
    (out / "Modelfile").write_text(ollama.modelfile_text(chosen["file"], t, meta_eos, spec.system), encoding="utf-8")
    info: dict[str, Any] = {"name": oname, "family": t.family, "gguf": chosen["file"],
                            "command": ollama.create_command(oname), "status": "not_run"}
    how = None if spec.create == "never" else ollama.ollama_reachable()
    if spec.create == "always" and how is None:
        raise StageFailed("export.ollama.create is 'always' but neither the ollama command nor its API on "
                          "localhost:11434 is available; install/start Ollama or set create: auto")
    if how is not None:
        info.update(ollama.create_and_smoke(out, oname, how))
        if info["status"] != "created":
            if spec.create == "always":
                raise StageFailed(f"ollama create/run of {oname} failed: {info.get('error', '')[-500:]}")
            t.warnings.append(f"ollama {info['status']}: {info.get('error', '')[-300:]}")
    return info, t.warnings


def run(ctx: StageContext) -> StageResult:
    reason = _skip_reason(ctx)
    if reason:
        return StageResult(state="skipped", message=reason)
    spec = ctx.job.export
    name = (ctx.model or {}).get("name") or ctx.job.name
    version = int((ctx.model or {}).get("version") or 1)
    train = ctx.summary_of("train", TrainSummary)
    if train is None or not train.base_model_path:
        raise StageFailed("the train stage recorded no base model path; run train before export "
                          "(stages: [prepare, train, export])")
    base_model_path = train.base_model_path
    config_path = Path(base_model_path) / "config.json"
    issues = export_problems(json.loads(config_path.read_text()) if config_path.is_file() else None, spec)
    if issues:
        raise StageFailed("; ".join(p.sentence() for p in issues))
    start = time.perf_counter()
    out = ctx.stage_dir / MODEL_DIR
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts clean
    out.mkdir(parents=True)
    merged_dir = out / "merged" if spec.merged else ctx.stage_dir / "merged-work"
    ctx.report_progress(force=True, phase="merge")
    device = ctx.device if str(ctx.device).startswith("cuda") else "cpu"
    model, tokenizer = merge.merge_adapter(base_model_path, ctx.input_artifact("train", "adapter"),
                                           ctx.input_artifact("train", "tokenizer"), merged_dir, device=device)
    shutil.copytree(ctx.input_artifact("train", "adapter"), out / "adapter")
    artifacts = {"model_dir": MODEL_DIR, "adapter": f"{MODEL_DIR}/adapter"}
    if spec.merged:
        artifacts["merged"] = f"{MODEL_DIR}/merged"
    ggufs, problems, warnings, meta = [], [], [], None
    info: dict[str, Any] = {}
    if spec.gguf:
        ggufs, problems, warnings, meta = _export_gguf(ctx, out, merged_dir, model, tokenizer, base_model_path, name)
    withheld = [g for g in ggufs if "withheld" in g]
    ggufs = [g for g in ggufs if "withheld" not in g]
    warnings += [f"{g['file']} withheld: {g['withheld']}" for g in withheld]
    verification = {"gguf": ggufs, "withheld": withheld, "problems": problems, "warnings": warnings}
    write_json_atomically(out / "verification.json", verification)
    if problems:
        raise StageFailed("GGUF verification failed: " + "; ".join(problems) + f" (details: {out}/verification.json)")
    if withheld and not ggufs:
        raise StageFailed("no GGUF file could be checked in llama.cpp on this machine: "
                          + "; ".join(g["withheld"] for g in withheld) + f" (details: {out}/verification.json)")
    for g in ggufs:
        artifacts[f"gguf_{g['type']}"] = f"{MODEL_DIR}/{g['file']}"
    if ggufs:
        info, more = _ollama(ctx, out, ggufs, tokenizer, meta.token("eos"), meta.add_bos,
                             ollama.ollama_name(name, version))
        warnings += more
        artifacts["modelfile"] = f"{MODEL_DIR}/Modelfile"
    if not spec.merged:
        shutil.rmtree(merged_dir, ignore_errors=True)
    verification.update(ollama=info, warnings=warnings)
    write_json_atomically(out / "verification.json", verification)
    artifacts["verification"] = f"{MODEL_DIR}/verification.json"
    rel = {k: v[len(MODEL_DIR) + 1:] for k, v in artifacts.items() if k != "model_dir"}
    prepare = ctx.summary_of("prepare", PrepareSummary)
    evaluation = ctx.summary_of("evaluate", EvaluateSummary)
    card = modelcard.model_card(
        name=name, version=version, base_model=ctx.job.base_model,
        datasets=[{"name": d.name, "rows": d.rows, "sha256": d.sha256} for d in ctx.datasets] or
        [{"name": "splits", "rows": prepare.rows if prepare else None}],
        train=ctx.job.train.model_dump(), train_summary=train.as_dict(),
        evaluation=evaluation.as_dict() if evaluation else None, ggufs=ggufs, ollama=info, artifacts=rel,
        withheld=withheld)
    (out / "README.md").write_text(card, encoding="utf-8")
    artifacts["model_card"] = f"{MODEL_DIR}/README.md"
    rel["model_card"] = "README.md"
    seconds = round(time.perf_counter() - start, 2)
    summary = {"export_seconds": seconds, "gguf": {g["type"]: {k: g.get(k) for k in (
        "size_bytes", "max_abs_diff", "top1_agreement", "export_seconds")} for g in ggufs},
        "ollama_status": info.get("status"), "ollama_command": info.get("command"), "warnings": len(warnings),
        "withheld": {g["type"]: g["withheld"] for g in withheld}}
    message = f"exported {name} v{version}"
    if withheld:
        message += "; withheld " + "; ".join(f"{g['file']} ({g['withheld']})" for g in withheld)
    if info.get("status") == "created":
        message += f"; Ollama model {info['name']} created (ollama run {info['name']})"
    elif info:
        message += f"; Ollama ({info['status']}): {info['command']}"
    if ggufs:
        ctx.emit_event("exported", message, ollama_command=info.get("command"), ollama_status=info.get("status"))
    # model.artifacts lists the files inside the model folder (relative to it); the registry keeps every
    # artifact at its published place, and the daemon publishes the model folder
    return StageResult(summary=summary, artifacts=artifacts, message=message,
                       model={"artifacts": rel, "gguf": [g["file"] for g in ggufs], "verification": verification},
                       model_artifacts={name: name for name in artifacts}, publish="model_dir")
