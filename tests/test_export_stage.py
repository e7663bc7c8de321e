"""The export stage end to end: a real child process exports builtin:tiny + a LoRA adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import export_fixtures as F
from handlers import export, modelio
from trainbox.errors import StageFailed
from trainbox.jobspec import ExportSpec
from trainbox.preflight import SUPPORTED_ARCHITECTURES, export_problems

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_child_process_exports_builtin_tiny(tmp_path):
    base = modelio.resolve_base_model("builtin:tiny", tmp_path)
    ctx = F.export_context(tmp_path, Path(base), model={"name": "tiny-job", "version": 3})
    proc = subprocess.run([sys.executable, "-m", "handlers", "export", str(ctx.stage_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ctx.stage_dir / "result.json").read_text())
    assert result["state"] == "succeeded"
    model_dir = ctx.stage_dir / "model"
    rel = result["model"]["artifacts"]
    for name in ("merged", "adapter", "gguf_f16", "gguf_q8_0", "modelfile", "verification", "model_card"):
        assert (model_dir / rel[name]).exists(), name
        assert (ctx.stage_dir / result["artifacts"][name]).exists(), name
    assert result["artifacts"]["model_dir"] == "model"
    gguf = result["summary"]["gguf"]
    assert gguf["f16"]["top1_agreement"] == 1.0  # q8_0 may flip a near-tie of a random model: >= 0.5 is enforced
    assert gguf["q8_0"]["top1_agreement"] >= 0.5 and gguf["q8_0"]["size_bytes"] < 0.6 * gguf["f16"]["size_bytes"]
    assert result["summary"]["gguf"]["f16"]["max_abs_diff"] < 1e-2
    modelfile = (model_dir / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-job-q8_0.gguf\n") and str(tmp_path) not in modelfile
    card = (model_dir / "README.md").read_text()
    assert "# tiny-job v3" in card and "tiny-job-f16.gguf" in card and str(ctx.stage_dir) not in card
    assert "ollama create tiny-job:v3 -f Modelfile" in card
    assert result["summary"]["ollama_command"].endswith("ollama create tiny-job:v3 -f Modelfile")
    events = [json.loads(line) for line in (ctx.stage_dir / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["exported"]
    # the merged folder is a normal HF model whose tokenizer has the chat template
    tok = modelio.load_tokenizer(model_dir / "merged")
    assert tok.chat_template == modelio.TINY_CHAT_TEMPLATE
    verification = json.loads((model_dir / "verification.json").read_text())
    assert verification["problems"] == [] and len(verification["gguf"]) == 2


def test_only_if_winner_skips_a_loser(tmp_path):
    base = modelio.resolve_base_model("builtin:tiny", tmp_path)
    ctx = F.export_context(tmp_path, Path(base), export={"only_if_winner": True}, evaluate={"winner": False})
    result = export.run(ctx)
    assert result.skipped and "did not beat" in result.message
    reason = "against the previous model: accuracy gain +0.010 is not significant"
    ctx = F.export_context(tmp_path / "again", Path(base), export={"only_if_winner": True},
                           evaluate={"winner": False, "winner_reason": reason})
    assert reason in export.run(ctx).message
    assert not (ctx.stage_dir / "model").exists()


def test_merged_only_export(tmp_path):
    base = modelio.resolve_base_model("builtin:tiny", tmp_path)
    ctx = F.export_context(tmp_path, Path(base), export={"gguf": []})
    result = export.run(ctx)
    assert sorted(result.model["artifacts"]) == ["adapter", "merged", "model_card", "verification"]
    assert result.model["gguf"] == [] and "modelfile" not in result.artifacts


def test_unsupported_architecture_fails_at_validation():
    problems = export_problems({"architectures": ["GPT2LMHeadModel"]}, ExportSpec())
    assert len(problems) == 1 and all(a in problems[0].message for a in SUPPORTED_ARCHITECTURES)
    assert export_problems({"architectures": ["GPT2LMHeadModel"]}, ExportSpec(gguf=[])) == []
    assert export_problems({"model_type": "qwen2"}, ExportSpec()) == []
    assert export_problems(None, ExportSpec()) == []


def test_unsupported_base_model_fails_the_stage(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(base)
    F.bpe_tokenizer(["<|endoftext|>"], None).save_pretrained(base)
    ctx = F.export_context(tmp_path, base)
    with pytest.raises(StageFailed, match="supported: LlamaForCausalLM"):
        export.run(ctx)


def test_merge_keeps_the_base_dtype(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from handlers.export.merge import merge_adapter

    tiny = modelio.build_tiny_model(tmp_path / "tiny")
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(base)
    modelio.load_tokenizer(tiny).save_pretrained(base)
    adapter = F.make_adapter(base, tmp_path / "adapter")
    model, _tok = merge_adapter(str(base), adapter, base, tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as fh:
        stored = fh.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert stored.dtype == torch.bfloat16
    # the reference model for verification holds exactly the stored (bf16-rounded) weights
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16), stored)
    assert not any("lora" in n for n in model.state_dict())


def export_child_with_llama_cpp_fault(tmp_path: Path, fault: str) -> tuple:
    """The export stage of builtin:tiny in a real child whose llama.cpp checker fails as ``fault`` says
    (llama_cpp_check's test hook); the stage must still succeed. Returns its context and result.json."""
    from handlers.export import llama_cpp_check

    if not llama_cpp_check.available():
        pytest.skip("llama-cpp-python (extra gguf-runtime) is not installed")
    base = modelio.resolve_base_model("builtin:tiny", tmp_path)
    ctx = F.export_context(tmp_path, Path(base), model={"name": "tiny-job", "version": 1})
    env = {**os.environ, llama_cpp_check.FAULT_ENV: fault}
    proc = subprocess.run([sys.executable, "-m", "handlers", "export", str(ctx.stage_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctx, json.loads((ctx.stage_dir / "result.json").read_text())


@pytest.mark.slow
def test_a_llama_cpp_crash_withholds_that_file_and_publishes_the_rest(tmp_path):
    """llama.cpp really dies of SIGSEGV on the Q8_0 file (test hook, as on CPUs whose AMX kernels crash):
    the stage succeeds with the F16 file and says which file was withheld, why, and what to do."""
    ctx, result = export_child_with_llama_cpp_fault(tmp_path, "SIGSEGV:q8_0")
    model_dir = ctx.stage_dir / "model"
    assert result["model"]["gguf"] == ["tiny-job-f16.gguf"] and "gguf_q8_0" not in result["artifacts"]
    assert not (model_dir / "tiny-job-q8_0.gguf").exists() and (model_dir / "tiny-job-f16.gguf").exists()
    reason = result["summary"]["withheld"]["q8_0"]
    assert reason.startswith("tiny-job-q8_0.gguf: llama.cpp was killed by SIGSEGV in the check 'generate from")
    assert "withheld tiny-job-q8_0.gguf (" in result["message"]
    verification = json.loads((model_dir / "verification.json").read_text())
    assert [g["file"] for g in verification["withheld"]] == ["tiny-job-q8_0.gguf"]
    assert verification["withheld"][0]["llama_cpp"]["signal"] == "SIGSEGV" and verification["problems"] == []
    assert any(w.startswith("tiny-job-q8_0.gguf withheld: ") for w in verification["warnings"])
    assert (model_dir / "Modelfile").read_text().startswith("FROM ./tiny-job-f16.gguf\n")
    card = (model_dir / "README.md").read_text()
    assert "## Files not published" in card
    assert "`tiny-job-q8_0.gguf` (q8_0): tiny-job-q8_0.gguf: llama.cpp was killed by SIGSEGV" in card


def test_a_stage_killed_by_a_signal_has_a_failure_message(tmp_path):
    """What the supervisor records when a stage dies of SIGSEGV: the signal and the log's last line, never empty."""
    from daemon.children import failure_message

    log = tmp_path / "stage.log"
    with open(log, "wb") as fh:
        code = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                               "import os, signal; print('converting blk.3', flush=True); "
                               "os.kill(os.getpid(), signal.SIGSEGV)"], stdout=fh, stderr=subprocess.STDOUT).returncode
    assert code == -signal.SIGSEGV
    message = failure_message("export", code, None, log, 40)
    first = message.splitlines()[0]
    assert first.startswith("stage export killed by SIGSEGV (a crash inside native code")
    assert first.endswith("its log ends with: File \"<string>\", line 1 in <module>"), first
    assert "converting blk.3" in message and "Fatal Python error: Segmentation fault" in message
    log.write_bytes(b"")
    assert failure_message("export", code, None, log, 40).splitlines()[0].endswith(": stage.log is empty")


@pytest.mark.slow
def test_a_crash_only_in_llama_cpps_extra_kernels_publishes_the_file_with_a_warning(tmp_path):
    """The AMX-like case: llama.cpp dies only while its extra CPU buffer types are on (test hook); the rerun
    without them verifies the Q8_0 file, which is published, and the crash is reported."""
    ctx, result = export_child_with_llama_cpp_fault(tmp_path, "SIGSEGV@extra:q8_0")
    assert result["model"]["gguf"] == ["tiny-job-f16.gguf", "tiny-job-q8_0.gguf"]
    assert result["summary"]["withheld"] == {}
    verification = json.loads((ctx.stage_dir / "model" / "verification.json").read_text())
    q8 = next(g for g in verification["gguf"] if g["type"] == "q8_0")
    assert q8["llama_cpp"]["default_kernels_crashed"].startswith("tiny-job-q8_0.gguf: llama.cpp was killed by SIGSEGV")
    assert q8["llama_cpp"]["tokenize_matches"] is True
    crash_warning = "q8_0: tiny-job-q8_0.gguf: llama.cpp was killed by SIGSEGV"
    assert any(w.startswith(crash_warning) for w in verification["warnings"])
    assert "verified with its extra CPU buffer types off" in (ctx.stage_dir / "model" / "README.md").read_text()
