"""trainbox's train stage against plain transformers.Trainer + peft, measured side by side in one run.

    python bench/train_bench.py                 # CPU: Llama-shaped 256x4 model, 32k tokenizer, alpaca rows
    python bench/train_bench.py --gpu           # CUDA: Phi-3.5-mini-shaped random model, LoRA bf16 and QLoRA 4-bit
    python bench/train_bench.py --gpu --tiny    # the --gpu rows on a small Phi-3 model on CPU (checks the script)
    python bench/train_bench.py --checkpoint-io # disk: one checkpoint the size of Phi-3.5-mini LoRA r=64 + AdamW

Both sides get the same model, the same encoded rows in the same order (trainbox's order for the seed, so the
final losses must agree), the same LoRA shape, optimizer and schedule. Every run is a fresh child process;
the two sides alternate, so a neighbour's load hits both. Tokens/s counts non-pad tokens on both sides
(trainbox: the train stage's own counter; Trainer: the collator's attention masks) over the training time
(trainbox: its steps; Trainer: on_train_begin to on_train_end). Peak memory is the child's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

DATA = Path("/work/shared/data")
ALPACA = DATA / "public" / "alpaca_en_demo.jsonl"
TOKENIZERS = {"llama32k": DATA / "tokenizers" / "tinyllama-1.1b-chat-v1.0",
              "phi3": DATA / "tokenizers" / "phi3-mini-4k-instruct"}
CPU_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 688, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
PHI35 = {"hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 32064,
         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
TINY_PHI3 = {**PHI35, "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 4}
SEED = 42
GPU_ROWS = {  # name -> settings shared by both sides (reference: Trainer + peft on one H100, issue 14)
    "LoRA bf16": {"method": "lora", "gradient_checkpointing": False},
    "LoRA bf16 + checkpointing": {"method": "lora", "gradient_checkpointing": True},
    "QLoRA 4-bit + checkpointing": {"method": "qlora", "bits": 4, "gradient_checkpointing": True},
    "QLoRA 8-bit + checkpointing": {"method": "qlora", "bits": 8, "gradient_checkpointing": True},
}
REFERENCE = {"LoRA bf16": "14.3k tok/s, 47 GiB", "LoRA bf16 + checkpointing": "10.3k tok/s, 12.8 GiB",
             "QLoRA 4-bit + checkpointing": "7.9k tok/s, 9.9 GiB",
             "QLoRA 8-bit + checkpointing": "2.3x slower than 4-bit, more memory"}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, {gpu}")


def make_model_dir(folder: Path, shape: dict[str, Any], tokenizer: str, device: str) -> str:
    """Random weights with ``shape`` next to a real tokenizer; built once per folder."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    if (folder / "config.json").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in TOKENIZERS[tokenizer].iterdir():
        if item.name.startswith("tokenizer") or item.name == "special_tokens_map.json":
            shutil.copy(item, folder / item.name)
    config_class = Phi3Config if tokenizer == "phi3" else LlamaConfig
    config = config_class(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    return str(folder)


def examples(limit: int) -> list:
    from trainbox.rows import read_examples

    return read_examples(ALPACA)[1][:limit]


def train_settings(spec: dict[str, Any]) -> dict[str, Any]:
    return {"max_steps": spec["steps"], "batch_size": spec["batch"], "max_seq_length": spec["seq"],
            "learning_rate": spec["lr"], "lora": {"r": spec["r"], "alpha": 2 * spec["r"], "dropout": 0.0},
            "method": spec.get("method", "lora"), "bits": spec.get("bits", 4), "device": spec["device"],
            "gradient_checkpointing": spec.get("gradient_checkpointing", False),
            "checkpoint": {"interval_seconds": 1e9}, "progress_log": {"interval_seconds": 1e9}}


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_trainbox(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """The real train stage, as the daemon's child would run it."""
    from handlers.context import load_context
    from handlers.train import run
    from train_fixtures import make_train_stage

    packed = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            packed.append("packed without padding" in record.getMessage())

    logging.getLogger("handlers.train.loop").addHandler(Seen())
    logging.getLogger("handlers.train.loop").setLevel(logging.INFO)
    stage = make_train_stage(root, {"train": examples(spec["rows"])}, train_settings(spec), seed=SEED,
                             base_model=spec["model"])
    s = run(load_context(stage)).summary
    rows = [json.loads(line) for line in (stage / "metrics" / "training_metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": s["tokens_per_s"], "train_s": s["train_seconds"], "final_loss": s["final_loss"],
            "losses": [r["loss"] for r in rows], "padding": 0.0 if packed and packed[0] else None,
            "peak_gib": peak_memory_gib(), "checkpoint_s": s["checkpoint_seconds"] / max(1, s["checkpoints_written"]),
            "method": s["method"], "gradient_checkpointing": s["gradient_checkpointing"]}


def run_trainer(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """Plain transformers.Trainer + peft + DataCollatorForSeq2Seq: what a user would write by hand."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainerCallback, TrainingArguments)

    from handlers.train.data import StepBatches, encode_split

    cuda = spec["device"] != "cpu"
    if not cuda:
        torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = encode_split(tokenizer, examples(spec["rows"]), spec["seq"], "train")
    order = StepBatches(rows, spec["batch"], 1, SEED, tokenizer.pad_token_id)  # trainbox's order for this seed
    dataset = [{"input_ids": r.input_ids, "labels": r.labels}
               for step in range(spec["steps"]) for r in order.step_rows(step)]
    counted = {"real": 0, "padded": 0}
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = seq2seq(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["attention_mask"].numel()
        return batch

    quantization = None
    if spec.get("method") == "qlora" and spec.get("bits", 4) == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    elif spec.get("method") == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if cuda else None)
    model.config.use_cache = False
    if quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["begin"] = time.monotonic()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = time.monotonic()

    args = TrainingArguments(
        output_dir=str(root / "out"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * spec["steps"]),
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=SEED,
        train_sampling_strategy="sequential", dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=spec.get("gradient_checkpointing", False) and not quantization,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = times["end"] - times["begin"]
    return {"tokens_per_s": counted["real"] / seconds, "train_s": seconds, "final_loss": losses[-1],
            "losses": losses, "padding": 1 - counted["real"] / counted["padded"], "peak_gib": peak_memory_gib()}


def child(side: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--spec", json.dumps(spec)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"bench child {side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, spec: dict[str, Any], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Alternate the two sides ``rounds`` times each (trainer first in odd rounds, trainbox first in even)."""
    runs: dict[str, list[dict[str, Any]]] = {"trainer": [], "trainbox": []}
    for i in range(rounds):
        for side in (("trainer", "trainbox") if i % 2 == 0 else ("trainbox", "trainer")):
            result = child(side, spec)
            runs[side].append(result)
            print(f"  {name}: {side:8} round {i + 1}: {result['tokens_per_s']:8.0f} tok/s, "
                  f"{result['train_s']:6.1f} s, final loss {result['final_loss']:.4f}", flush=True)
    return runs


def print_table(results: dict[str, dict[str, list[dict[str, Any]]]], reference: dict[str, str] | None = None) -> None:
    print(f"\n{'configuration':30} {'side':9} {'tok/s (median)':>14} {'ratio':>6} {'padding':>8} {'peak GiB':>9} "
          f"{'final loss':>10} {'mean |dloss|':>12}")
    for name, runs in results.items():
        base = statistics.median(r["tokens_per_s"] for r in runs["trainer"])
        gap = statistics.mean(abs(a - b) for a, b in zip(runs["trainbox"][0]["losses"], runs["trainer"][0]["losses"]))
        for side in ("trainer", "trainbox"):
            rs = runs[side]
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            padding = rs[0]["padding"]
            print(f"{name:30} {side:9} {tps:>14.0f} {tps / base:>5.2f}x "
                  f"{'n/a' if padding is None else f'{100 * padding:.0f} %':>8} "
                  f"{max(r['peak_gib'] for r in rs):>9.2f} {rs[0]['final_loss']:>10.4f} "
                  f"{gap if side == 'trainbox' else 0:>12.2e}"
                  + (f"  reference {reference[name]}" if reference and side == "trainer" else ""))
        ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["trainer"], runs["trainbox"])]
        print(f"{'':30} per-round ratios: {', '.join(f'{r:.2f}x' for r in ratios)}")
        tb = runs["trainbox"][0]
        print(f"{'':30} one trainbox checkpoint: {tb['checkpoint_s']:.2f} s = "
              f"{100 * tb['checkpoint_s'] / 180:.3f} % of a 180 s interval")


def cpu_bench(steps: int, rounds: int, model_dir: Path) -> None:
    spec = {"model": make_model_dir(model_dir, CPU_MODEL, "llama32k", "cpu"), "device": "cpu", "rows": 400,
            "steps": steps, "batch": 8, "seq": 512, "lr": 2e-4, "r": 16, "threads": 1}
    print(f"machine: {machine()}")
    print(f"model: Llama {CPU_MODEL['hidden_size']} hidden x {CPU_MODEL['num_hidden_layers']} layers, random "
          f"weights, TinyLlama's 32k tokenizer; data: {ALPACA.name}; {steps} steps x batch {spec['batch']}, "
          f"max_seq_length {spec['seq']}, LoRA r {spec['r']} on all linear layers, 1 CPU thread each side")
    print_table({"CPU LoRA fp32": compare("CPU LoRA fp32", spec, rounds)})


def gpu_bench(steps: int, rounds: int, seq: int, model_dir: Path, tiny: bool) -> None:
    import torch

    device = "cpu" if tiny else "cuda"
    shape = TINY_PHI3 if tiny else PHI35
    model = make_model_dir(model_dir / ("tiny" if tiny else "full"), shape, "phi3", device)
    print(f"machine: {machine()}")
    print(f"model: Phi-3 shaped {shape['hidden_size']} hidden x {shape['num_hidden_layers']} layers, vocab "
          f"{shape['vocab_size']}, random weights, Phi-3 tokenizer; alpaca rows; {steps} steps x batch 4, "
          f"max_seq_length {seq}, LoRA r 64 on all linear layers")
    results = {}
    for name, extra in GPU_ROWS.items():
        if extra["method"] == "qlora" and not torch.cuda.is_available():
            print(f"  {name}: skipped (bitsandbytes QLoRA needs CUDA)")
            continue
        spec = {"model": model, "device": device, "rows": 600, "steps": steps, "batch": 4, "seq": seq, "lr": 2e-4,
                "r": 64, "threads": 1, **extra}
        results[name] = compare(name, spec, rounds)
    print_table(results, None if tiny else REFERENCE)


def checkpoint_io_bench() -> None:
    """A checkpoint as big as Phi-3.5-mini LoRA r=64 on all linear layers: fp32 adapter + AdamW moments."""
    import torch
    from safetensors.torch import save_file

    from handlers.train.checkpoints import rotate_checkpoints, write_checkpoint_atomically

    r, h, layers = 64, PHI35["hidden_size"], PHI35["num_hidden_layers"]
    shapes = {"qkv_proj": (h, 3 * h), "o_proj": (h, h), "gate_up_proj": (h, 2 * PHI35["intermediate_size"]),
              "down_proj": (PHI35["intermediate_size"], h)}
    params = {f"layers.{i}.{n}.lora_{ab}.weight": torch.randn(r, a) if ab == "A" else torch.randn(b, r)
              for i in range(layers) for n, (a, b) in shapes.items() for ab in "AB"}
    count = sum(t.numel() for t in params.values())

    def write(folder: Path) -> None:
        (folder / "adapter").mkdir()
        save_file(params, str(folder / "adapter" / "adapter_model.safetensors"))
        torch.save({"exp_avg": list(params.values()), "exp_avg_sq": list(params.values())}, folder / "optimizer.pt")

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        times = []
        for step in range(3):
            started = time.monotonic()
            write_checkpoint_atomically(Path(tmp), step + 1, "rolling", write)
            rotate_checkpoints(Path(tmp), keep=2)
            times.append(time.monotonic() - started)
    gib = count * 4 * 3 / 2**30
    best = min(times)
    print(f"machine: {machine()}")
    print(f"LoRA r=64 Phi-3.5-mini: {count / 1e6:.0f} M adapter params, checkpoint {gib:.2f} GiB")
    print(f"write+fsync+sha256+rename: {', '.join(f'{t:.2f}' for t in times)} s (best {best:.2f} s, "
          f"{gib / best:.2f} GiB/s) -> {100 * best / 180:.2f}% of a 180 s interval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Phi-3.5-mini-shaped LoRA bf16 / QLoRA 4-bit rows")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: a small Phi-3 model on CPU (script check)")
    parser.add_argument("--checkpoint-io", action="store_true", help="time one Phi-3.5 LoRA-sized checkpoint")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainbox-bench-models")
    parser.add_argument("--side", choices=("trainbox", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        spec = json.loads(args.spec)
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_trainbox if args.side == "trainbox" else run_trainer)(spec, Path(tmp))
        print(json.dumps(result))
    elif args.gpu:
        gpu_bench(args.steps or (4 if args.tiny else 30), args.rounds, 256 if args.tiny else args.seq,
                  args.model_dir, args.tiny)
    elif args.checkpoint_io:
        checkpoint_io_bench()
    else:
        cpu_bench(args.steps or 30, args.rounds, args.model_dir / "llama-256x4")


if __name__ == "__main__":
    main()
