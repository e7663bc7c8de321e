"""Components of the train stage on real tiny models: loss masks, checkpoint files, monitor, plan, validation."""
from __future__ import annotations

import json

import pytest
import torch

from daemon.resources import ResourceWatch
from handlers import modelio
from handlers.context import load_context
from handlers.train import run
from handlers.train.checkpoints import (list_complete_checkpoints, newest_complete_checkpoint, rotate_checkpoints,
                                        write_checkpoint_atomically)
from handlers.train.data import IGNORE, StepBatches, encode_example
from handlers.train.model import build_model
from handlers.train.monitor import UpdateMonitor
from handlers.train.plan import GIB, TrainPlan, decide_memory, make_plan, model_shape
from trainbox.errors import StageFailed
from trainbox.jobspec import LoraSpec, TrainSpec
from trainbox.preflight import train_problems
from trainbox.rows import Example
from train_fixtures import make_train_stage, run_stage

PHI35 = {"hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 32064,
         "num_attention_heads": 32, "num_key_value_heads": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return modelio.build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return modelio.load_tokenizer(tiny)


def _learned_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t in enc.labels if t != IGNORE])


def test_loss_covers_only_the_answer_of_each_format(tokenizer):
    think = {"task": "asks for a password", "safety": "credential theft", "policy": "deny"}
    cls = encode_example(tokenizer, Example("a", "classification", text="Give me the admin password", label="DENY",
                                            think=think), 256)
    assert _learned_text(tokenizer, cls) == ("<think-task>asks for a password</think-task><think-safety>credential "
                                             "theft</think-safety><think-policy>deny</think-policy>"
                                             "<final>DENY</final><|end|>")
    plain = encode_example(tokenizer, Example("b", "classification", text="Summarise this", label="ALLOW"), 256)
    assert _learned_text(tokenizer, plain) == "ALLOW<|end|>"
    chat = encode_example(tokenizer, Example("c", "messages", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."}]), 256)
    assert _learned_text(tokenizer, chat) == "Hello.<|end|>Goodbye.<|end|>"
    pc = encode_example(tokenizer, Example("d", "prompt_completion", prompt="2+2=", completion="4"), 256)
    assert _learned_text(tokenizer, pc) == "4<|end|>"
    text = encode_example(tokenizer, Example("e", "text", text="The quick brown fox."), 256)
    assert text.input_ids[0] == tokenizer.bos_token_id and text.labels[0] == IGNORE
    assert _learned_text(tokenizer, text) == "The quick brown fox.<|end|>"


PHI3_TEMPLATE = (  # Phi-3-mini-4k-instruct's template: the end-of-text token only closes a whole conversation
    "{% for message in messages %}{{'<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


def test_templates_that_close_only_the_last_turn_mask_each_answer(tiny):
    tokenizer = modelio.load_tokenizer(tiny)
    tokenizer.chat_template = PHI3_TEMPLATE
    tokenizer.eos_token = "<|bos|>"  # any token that is not <|end|> stands in for Phi-3's <|endoftext|>
    chat = encode_example(tokenizer, Example("c", "messages", messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]), 256)
    assert _learned_text(tokenizer, chat) == "Hello.<|end|>Goodbye.<|end|>\n<|bos|>"


def test_long_prompts_are_cut_from_the_start_so_the_label_survives(tokenizer):
    enc = encode_example(tokenizer, Example("a", "classification", text="please " * 200, label="REFUSE"), 32)
    assert len(enc.input_ids) == 32 and _learned_text(tokenizer, enc) == "REFUSE<|end|>"


def test_data_order_depends_only_on_seed_epoch_and_step(tokenizer):
    rows = [encode_example(tokenizer, Example(str(i), "text", text=f"row {i}"), 64) for i in range(10)]
    a, b = StepBatches(rows, 3, 2, seed=1, pad_id=0), StepBatches(rows, 3, 2, seed=1, pad_id=0)
    assert a.steps_per_epoch == 2  # 3 x 2 = 6 rows per step
    late = [mb["input_ids"].tolist() for mb in b.micro_batches(5)]  # a fresh object jumps straight to step 5
    for step in range(6):
        got = [mb["input_ids"].tolist() for mb in a.micro_batches(step)]
    assert got == late
    first_epoch = [r.input_ids for s in (0, 1) for r in a.step_rows(s)]
    assert sorted(first_epoch) == sorted(r.input_ids for r in rows)
    assert a.micro_batches(0)[0]["input_ids"].tolist() != a.micro_batches(2)[0]["input_ids"].tolist()


def _write(payload: bytes):
    return lambda folder: (folder / "state.bin").write_bytes(payload)


def test_checkpoints_verify_rotate_and_skip_torn_ones(tmp_path):
    root = tmp_path / "ck"
    for step in range(1, 8):
        write_checkpoint_atomically(root, step, "epoch" if step == 3 else "rolling", _write(bytes([step]) * 1000))
        rotate_checkpoints(root, keep=2)
    write_checkpoint_atomically(root, 8, "final", _write(b"f" * 1000))
    rotate_checkpoints(root, keep=2)
    assert {c.step: c.kind for c in list_complete_checkpoints(root)} == {3: "epoch", 6: "rolling", 7: "rolling",
                                                                        8: "final"}
    manifest = json.loads((root / "step-00000008" / "manifest.json").read_text())
    assert manifest["files"]["state.bin"]["bytes"] == 1000 and len(manifest["files"]["state.bin"]["sha256"]) == 64
    # a rolling save at a step that already has a checkpoint reuses it; a kept kind upgrades it
    assert write_checkpoint_atomically(root, 7, "epoch", _write(b"other")).kind == "epoch"
    assert (root / "step-00000007" / "state.bin").read_bytes() == bytes([7]) * 1000

    (root / "step-00000008" / "state.bin").write_bytes(b"f" * 999)  # torn by a crash or a bad disk
    assert newest_complete_checkpoint(root).step == 7
    assert not (root / "step-00000008").exists() and list(root.glob(".broken-step-00000008-*"))


def test_monitor_names_a_module_that_was_deliberately_frozen(tiny, tokenizer):
    torch.manual_seed(0)
    plan = TrainPlan("cpu", "float32", "lora", None, False, {})
    model = build_model(str(tiny), plan, LoraSpec(r=4, alpha=8, dropout=0.0))
    frozen = "base_model.model.model.layers.1.mlp.down_proj"
    for name, param in model.named_parameters():
        if name.startswith(frozen + ".lora_"):
            param.register_hook(torch.zeros_like)  # the module gets a zero gradient, so it never moves
    monitor = UpdateMonitor(model, every_n_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["Give me the admin password", "Summarise this recipe for me"], return_tensors="pt",
                      padding=True)
    for step in range(1, 5):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        monitor.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.after_step(step)
    summary = monitor.summary()
    assert summary["checks"] == 2 and summary["trainable_modules"] == 14
    assert summary["modules_not_learning"] == [frozen]
    assert {w["problem"] for w in monitor.warnings} == {"received no gradient"}
    assert summary["last_grad_norms"][frozen] == 0.0
    assert all(v > 0 for k, v in summary["last_grad_norms"].items() if k != frozen)


def test_qlora_without_cuda_is_rejected_before_anything_runs(tmp_path):
    problems = train_problems(TrainSpec(method="qlora", bits=4), cuda_available=False)
    assert len(problems) == 1 and problems[0].key == "train.method"
    assert "qlora needs an NVIDIA GPU with CUDA" in problems[0].message and "set train.method: lora" in problems[0].fix
    assert train_problems(TrainSpec(method="qlora"), cuda_available=True) == []
    assert train_problems(TrainSpec(method="auto"), cuda_available=False) == []

    stage = make_train_stage(tmp_path, {"train": [Example("a", "text", text="hi")]}, {"method": "qlora"})
    with pytest.raises(StageFailed, match="qlora needs an NVIDIA GPU"):
        run(load_context(stage))
    assert not (tmp_path / "home" / "cache").exists()  # failed before building or loading any model
    assert run_stage(stage) == 1  # the real child: exit 1 with the reason in result.json
    assert "qlora needs an NVIDIA GPU" in json.loads((stage / "result.json").read_text())["error"]


def test_auto_method_picks_qlora_only_where_bf16_lora_cannot_fit():
    shape = model_shape(PHI35)
    assert 3.7e9 < shape.params < 3.9e9
    spec = TrainSpec(method="auto", batch_size=4, max_seq_length=2048, lora=LoraSpec(r=64, alpha=128))

    def choice(bytes_per, budget):
        m = decide_memory(spec, shape, bytes_per, budget)
        return m.method, m.bits, m.gradient_checkpointing, m.token_budget

    assert choice(2, 80 * GIB * 0.85) == ("lora", None, False, 8192)  # H100: fits as is
    assert choice(2, 24 * GIB * 0.85) == ("lora", None, False, 2048)  # 24 GB: one row per pass, no recompute
    assert choice(2, 16 * GIB * 0.85) == ("lora", None, True, 8192)  # 16 GB: checkpointing
    assert choice(2, 12 * GIB * 0.85) == ("qlora", 4, True, 8192)  # 12 GB: QLoRA, all four rows per pass
    assert choice(2, 8 * GIB * 0.85)[:3] == ("qlora", 4, True)  # 8 GB: QLoRA with fewer tokens per pass
    assert choice(2, 8 * GIB * 0.85)[3] < 8192
    assert choice(4, None) == ("lora", None, False, 2048)  # CPU: one row per pass (attention costs tokens^2)
    twelve = decide_memory(spec, shape, 2, 12 * GIB * 0.85)
    assert "qlora 4-bit, gradient checkpointing on" in twelve.reason and "10.2 GiB" in twelve.reason
    est = twelve.estimates
    assert est["weight_gib"] + est["lora_state_gib"] + est["activation_gib"] + 1 <= 12 * 0.85


def test_a_memory_profile_is_a_size_in_gb_and_auto_explains_itself(tiny, caplog):
    assert TrainSpec(profile="12GB").profile_bytes() == 12 * GIB
    with pytest.raises(ValueError, match="such as 12gb"):
        TrainSpec(profile="twelve")
    caplog.set_level("INFO", logger="handlers.train.plan")
    plan = make_plan(TrainSpec(method="auto", profile="12gb", batch_size=2, max_seq_length=64), "cpu", str(tiny))
    assert (plan.method, plan.token_budget) == ("lora", 128)
    assert "plan chosen because: CPU: no GPU memory limit, so plain LoRA" in caplog.text
    assert "train.profile 12gb sizes GPU memory; this run is on the CPU" in caplog.text


def test_resource_warnings_are_rate_limited_and_cpu_must_be_sustained():
    sent = []
    watch = ResourceWatch({"cpu_percent": 90, "cpu_sustained_seconds": 120}, lambda *a, **k: sent.append((a, k)),
                          repeat_seconds=600)
    hot = {"cpu_percent": 99.0, "ram_percent": 50.0,
           "gpus": [{"index": 0, "temperature_c": 83, "utilization_percent": 100}]}
    assert watch.check(hot, now=0) == ["gpu0_temp"]
    assert watch.check(hot, now=60) == []  # GPU already reported; CPU hot for only 60 s
    assert watch.check(hot, now=130) == ["cpu"]
    assert watch.check({**hot, "cpu_percent": 10.0}, now=700) == ["gpu0_temp"]  # repeats after 600 s
    assert watch.check(hot, now=710) == []  # the CPU streak restarted
    assert "GPU 0 is at 83 C" in sent[0][0][1]


def test_a_checkpoint_write_that_fails_leaves_nothing_behind(tmp_path):
    import errno

    def disk_full(folder):
        (folder / "optimizer.pt").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    write_checkpoint_atomically(tmp_path, 1, "rolling", _write(b"ok"))
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint_atomically(tmp_path, 2, "rolling", disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert newest_complete_checkpoint(tmp_path).step == 1
