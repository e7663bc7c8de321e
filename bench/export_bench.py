"""GGUF export time and file size against model size, side by side with copying the same bytes once.

Baseline: read the model's safetensors bytes and write them to a new file (fsync), the least any export can
do. Target: F16 export <= 2x that time. Usage: ``python bench/export_bench.py [--sizes S M L] [--repeat N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {  # name -> (hidden, layers, intermediate, vocab)
    "S": (256, 4, 688, 8000),
    "M": (512, 8, 1376, 16000),
    "L": (1024, 8, 2752, 32000),
    "XL": (2048, 8, 5504, 32000),
    "phi3.5-mini-8L": (3072, 8, 8192, 32064),  # Phi-3.5-mini's shapes with 8 of its 32 layers
}


def build(out_dir: Path, size: str, dtype: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    hidden, layers, inter, vocab = SIZES[size]
    if size.startswith("phi3"):
        half = hidden // 32 // 2
        config = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                            original_max_position_embeddings=4096, tie_word_embeddings=False,
                            rope_scaling={"rope_type": "longrope", "long_factor": [1.0] * half,
                                          "short_factor": [1.0] * half})
        model_cls = Phi3ForCausalLM
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                             max_position_embeddings=2048, tie_word_embeddings=False)
        model_cls = LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("meta"):  # no random init: the bench times I/O, any values do
        model = model_cls(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def copy_once(src: Path, dst: Path) -> float:
    """Read every byte of ``src`` and write it to ``dst`` with an fsync, like the export's final write."""
    buf = memoryview(bytearray(16 << 20))  # one reused buffer: the fastest plain copy Python can do
    start = time.perf_counter()
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(buf[:n])
        os.fsync(fout.fileno())
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def bench_one(root: Path, size: str, dtype: str, repeat: int) -> dict:
    from handlers.export.gguf_writer import write_gguf
    from handlers.export.tokenizer_meta import NORMAL, TokenizerMeta

    model_dir = build(root / f"{size}-{dtype}", size, dtype)
    config = json.loads((model_dir / "config.json").read_text())
    vocab = int(config["vocab_size"])
    meta = TokenizerMeta(model="gpt2", pre="gpt-2", tokens=[f"t{i}" for i in range(vocab)],
                         token_types=[NORMAL] * vocab, merges=[])
    src = model_dir / "model.safetensors"
    short = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)
    row = {"model": f"{size} ({short})", "params_m": 0.0, "source_mb": src.stat().st_size / 1e6}
    times: dict[str, list[float]] = {"copy": [], "f16": [], "q8_0": []}
    sizes: dict[str, int] = {}
    for _ in range(repeat):  # interleaved, so a busy moment on a shared machine hits every column alike
        times["copy"].append(copy_once(src, root / "copy.bin"))
        for out_type in ("f16", "q8_0"):
            result = write_gguf(model_dir, root / f"out-{out_type}.gguf", out_type, meta, name="bench",
                                config=config)
            times[out_type].append(result.seconds)
            sizes[out_type] = result.size_bytes
            (root / f"out-{out_type}.gguf").unlink()
    row["copy_s"] = min(times["copy"])
    for out_type in ("f16", "q8_0"):
        row[f"{out_type}_s"] = min(times[out_type])
        row[f"{out_type}_mb"] = sizes[out_type] / 1e6
    row["params_m"] = row["source_mb"] / (4 if dtype == "float32" else 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["S", "M", "L"], choices=sorted(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        for size in args.sizes:
            for dtype in args.dtypes:
                rows.append(bench_one(Path(tmp), size, dtype, args.repeat))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}")
    head = (f"{'model':<22}{'params M':>9}{'src MB':>9}{'copy s':>8}{'f16 s':>8}{'f16 MB':>8}{'f16/copy':>9}"
            f"{'q8_0 s':>8}{'q8_0 MB':>8}{'q8/copy':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<22}{r['params_m']:>9.1f}{r['source_mb']:>9.1f}{r['copy_s']:>8.3f}{r['f16_s']:>8.3f}"
              f"{r['f16_mb']:>8.1f}{r['f16_s'] / r['copy_s']:>9.2f}{r['q8_0_s']:>8.3f}{r['q8_0_mb']:>8.1f}"
              f"{r['q8_0_s'] / r['copy_s']:>8.2f}")
    worst = max(r["f16_s"] / r["copy_s"] for r in rows)
    print(f"target: F16 export <= 2.00x copy; worst here {worst:.2f}x -> {'met' if worst <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
