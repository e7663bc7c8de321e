"""Train-stage throughput and checkpoint overhead, measured side by side in one run.

    python bench/train_bench.py                 # CPU: builtin tiny model on the demo data, with/without checkpoints
    python bench/train_bench.py --checkpoint-io # disk: one checkpoint the size of Phi-3.5-mini LoRA r=64 + AdamW
    python bench/train_bench.py --gpu           # CUDA: Phi-3.5-mini-shaped random model, LoRA bf16 and QLoRA 4-bit

Every row runs the real train stage (``handlers.train.run``) in a fresh child process, so peak memory and
start-up are per configuration. Overhead % = checkpoint seconds / training seconds, scaled to the default
180 s interval where the bench checkpoints more often than that.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PHI35 = {"hidden_size": 3072, "num_hidden_layers": 32, "intermediate_size": 8192, "vocab_size": 32064,
         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
GPU_ROWS = {  # name -> train settings (reference: Trainer + peft on one H100, see bench/README.md)
    "lora-bf16": {"method": "lora", "gradient_checkpointing": False},
    "lora-bf16-ckpt": {"method": "lora", "gradient_checkpointing": True},
    "qlora-4bit-ckpt": {"method": "qlora", "bits": 4, "gradient_checkpointing": True},
    "qlora-4bit-ckpt-b1": {"method": "qlora", "bits": 4, "gradient_checkpointing": True, "batch_size": 1},
}
REFERENCE = {"lora-bf16": "14.3k tok/s, 47 GiB", "lora-bf16-ckpt": "10.3k tok/s, 12.8 GiB",
             "qlora-4bit-ckpt": "7.9k tok/s, 9.9 GiB", "qlora-4bit-ckpt-b1": "5.3k tok/s, 5.5 GiB"}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{len(__import__('os').sched_getaffinity(0))} cores, torch {torch.__version__}, {gpu}")


def run_one(root: Path, train: dict, base_model: str, rows: list | None = None) -> dict:
    """Run the train stage in this process and return its summary plus peak GPU memory."""
    import torch

    from handlers.context import load_context
    from handlers.train import run
    from train_fixtures import demo_examples, make_train_stage, split_by_hash

    splits = {"train": rows} if rows is not None else split_by_hash(demo_examples())
    stage = make_train_stage(root, splits, train, base_model=base_model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = run(load_context(stage))
    summary = dict(result.summary, wall_s=round(time.monotonic() - started, 2))
    if torch.cuda.is_available():
        summary["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return summary


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"bench child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_checkpoint(s: dict) -> float:
    return s["checkpoint_seconds"] / max(1, s["checkpoints_written"])


def cpu_bench(steps: int) -> None:
    base = {"max_steps": steps, "batch_size": 8, "max_seq_length": 128, "lora": {"r": 16, "alpha": 32},
            "learning_rate": 1e-2}
    rows = {"no periodic checkpoints": {**base, "checkpoint": {"interval_seconds": 1e9}},
            "checkpoint every 10 steps": {**base, "checkpoint": {"interval_seconds": 1e9, "every_steps": 10}}}
    results = {name: child(["--one", json.dumps({"train": train, "base_model": "builtin:tiny"})])
               for name, train in rows.items()}
    print(f"machine: {machine()}")
    print(f"{'configuration':28} {'tokens/s':>10} {'train s':>8} {'ckpts':>6} {'ckpt s':>7} {'ckpt %':>7}")
    for name, s in results.items():
        print(f"{name:28} {s['tokens_per_s']:>10.0f} {s['train_seconds']:>8.2f} {s['checkpoints_written']:>6} "
              f"{s['checkpoint_seconds']:>7.2f} {100 * s['checkpoint_seconds'] / s['train_seconds']:>6.1f}%")
    per = per_checkpoint(results["checkpoint every 10 steps"])
    print(f"one tiny-model checkpoint: {per * 1000:.0f} ms -> {100 * per / 180:.3f}% of a 180 s interval")


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


def make_phi35_dir(folder: Path) -> str:
    """Random bf16 weights with Phi-3.5-mini's shapes and the builtin tokenizer (ids fit the 32064 vocab)."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    from handlers.modelio import build_tiny_model, load_tokenizer

    if not (folder / "config.json").exists():
        config = Phi3Config(**PHI35, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        load_tokenizer(build_tiny_model(folder / "tok")).save_pretrained(folder)
    return str(folder)


def gpu_bench(steps: int, seq: int, model_dir: Path) -> None:
    ref = make_phi35_dir(model_dir)
    print(f"machine: {machine()}")
    print(f"{'configuration':22} {'tokens/s':>9} {'peak GiB':>9} {'ckpt %@180s':>12}  reference (Trainer+peft, H100)")
    for name, extra in GPU_ROWS.items():
        train = {"max_steps": steps, "batch_size": 4, "max_seq_length": seq, "learning_rate": 2e-4,
                 "lora": {"r": 64, "alpha": 128, "dropout": 0.05}, "device": "cuda",
                 "checkpoint": {"interval_seconds": 1e9, "every_steps": max(1, steps // 2)}, **extra}
        s = child(["--one", json.dumps({"train": train, "base_model": ref, "synthetic_seq": seq})])
        pct = 100 * per_checkpoint(s) / 180
        print(f"{name:22} {s['tokens_per_s']:>9.0f} {s.get('peak_gib', float('nan')):>9.2f} {pct:>11.2f}%  "
              f"{REFERENCE[name]}")


def synthetic_rows(seq: int, count: int) -> list:
    from daemon.formats import Example

    words = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()
    text = " ".join(words[i % len(words)] for i in range(seq * 2))  # longer than seq: every row is full length
    return [Example(str(i), "text", text=f"{i} {text}") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Phi-3.5-mini-shaped LoRA bf16 / QLoRA 4-bit rows")
    parser.add_argument("--checkpoint-io", action="store_true", help="time one Phi-3.5 LoRA-sized checkpoint")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainbox-phi35-random")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        rows = synthetic_rows(spec["synthetic_seq"], 64) if spec.get("synthetic_seq") else None
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_one(Path(tmp), spec["train"], spec["base_model"], rows)
        print(json.dumps(summary))
    elif args.gpu:
        gpu_bench(args.steps or 30, args.seq, args.model_dir)
    elif args.checkpoint_io:
        checkpoint_io_bench()
    else:
        cpu_bench(args.steps or 60)


if __name__ == "__main__":
    main()
