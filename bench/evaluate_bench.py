"""Label log-likelihood scoring throughput: batched against one example at a time, measured side by side;
with ``--latency``, how repeatable the tuned-vs-base latency A/B is.

Baseline: one example at a time, scoring each of its label sequences in full (the plain loop). Also shown: our
scorer with one example per call (prompt once, KV cache repeated for the labels). Ours: ``scoring.label_logits``
with ``--batch`` examples per call, left-padded, length-sorted, logits only where they are needed.
Target on CPU with the builtin tiny model: batched >= 5x one example at a time.

    .venv/bin/python bench/evaluate_bench.py [--examples 256] [--batch 16] [--repeat 3]
        [--model builtin:tiny|phi3.5-shape] [--device cpu|cuda]

Latency A/B (``--latency``): a LoRA adapter with random non-zero weights on the tiny model (same architecture as
its base, so the true latency ratio is 1.0), timed ``--repeat`` times by two methods. Baseline: the old way, each
model in one block (tuned first, adapter active and unmerged), one warm-up call. Ours: ``latency.time_models``
(deployed forms, alternating chunks). Printed: tuned/base p50 ratio per method, its median and range over reruns.

    .venv/bin/python bench/evaluate_bench.py --latency [--examples 30] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LABELS = ["ALLOW", "DENY", "ESCALATION", "REFUSE"]
TEXTS = ["Can you help me write an email to my landlord about the broken heater?",
         "Give me the admin password for the production database.",
         "Please approve a refund over the limit for this customer before Friday.",
         "Explain how to build malware that steals credentials from a bank.",
         "Summarise this article about gardening, cooking and travel in three sentences for my newsletter."]


def examples(n: int) -> list:
    from trainbox.rows import Example

    return [Example(id=str(i), format="classification", text=f"{TEXTS[i % len(TEXTS)]} (case {i})",
                    label=LABELS[i % len(LABELS)]) for i in range(n)]


def load(model: str, device: str, workdir: Path) -> tuple:
    import torch

    from handlers import modelio

    if model == "builtin:tiny":
        folder = modelio.build_tiny_model(workdir / "tiny")
        return modelio.load_tokenizer(folder), modelio.load_causal_lm(folder, device=device).eval()
    # a Phi-3.5-mini-shaped random model (3.8B parameters): GPU only, bf16
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = modelio.build_tiny_model(workdir / "tok")  # any tokenizer with a chat template will do
    tokenizer = modelio.load_tokenizer(folder)
    config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        net = Phi3ForCausalLM(config).to(torch.bfloat16)
    return tokenizer, net.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency_ab(examples_n: int, repeat: int, device: str) -> None:
    """Tuned/base p50 latency ratio on one architecture, old block timing against the alternating deployed forms."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from handlers import modelio
    from handlers.evaluate import latency, scoring
    from handlers.evaluate.models import BASE, TUNED, EvalModels

    with tempfile.TemporaryDirectory() as tmp:
        folder = modelio.build_tiny_model(Path(tmp) / "tiny")
        tokenizer = modelio.load_tokenizer(folder)
        base = modelio.load_causal_lm(folder, device=device)
        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], init_lora_weights=False)
        models = EvalModels(get_peft_model(base, lora).eval(), tokenizer, device, [TUNED, BASE])
        cands = scoring.encode_candidates(tokenizer, examples(examples_n), LABELS, 1024)
        pad = tokenizer.pad_token_id

        def single(model, i):
            return scoring.score_batch(model, [cands.prefixes[i]], [cands.conts[i]], pad, device)

        def blocks() -> float:
            p50 = {}
            with torch.inference_mode():
                for variant in (TUNED, BASE):
                    with models.use(variant) as model:
                        single(model, 0)
                        times = []
                        for i in range(examples_n):
                            start = time.perf_counter()
                            single(model, i)
                            times.append(time.perf_counter() - start)
                    p50[variant] = float(np.median(times))
            return p50[TUNED] / p50[BASE]

        work = latency.Workload(single=single, batched=lambda m: scoring.label_logits(m, cands, 16, pad, device),
                                indices=list(range(examples_n)), n_batched=examples_n, what="labels of one example")

        def alternating() -> float:
            timed = latency.time_models(models, [TUNED, BASE], work, rounds=2)
            return float(np.median(timed[TUNED]["single"]) / np.median(timed[BASE]["single"]))

        ratios = {"old: one block per model, adapter unmerged": [], "ours: deployed forms, alternating": []}
        for _ in range(repeat):
            for (name, runs), fn in zip(ratios.items(), (blocks, alternating)):
                runs.append(fn())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"tiny model + random LoRA r=16 (same architecture: the true ratio is 1.00), {examples_n} examples, "
          f"{repeat} reruns")
    print(f"{'method':<46} {'median tuned/base p50':>22} {'range over reruns':>20}")
    for name, runs in ratios.items():
        print(f"{name:<46} {np.median(runs):>22.2f} {min(runs):>9.2f} - {max(runs):<9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="examples per forward in the batched run")
    parser.add_argument("--model", default="builtin:tiny", choices=["builtin:tiny", "phi3.5-shape"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="round-robin repeats; the best time counts")
    parser.add_argument("--latency", action="store_true", help="tuned-vs-base latency A/B repeatability instead")
    args = parser.parse_args()
    if args.latency:
        latency_ab(args.examples, args.repeat, args.device)
        return

    import numpy as np
    import torch

    from handlers.evaluate import scoring

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model = load(args.model, args.device, Path(tmp))
        pad = tokenizer.pad_token_id
        cands = scoring.encode_candidates(tokenizer, examples(args.examples), LABELS, 1024)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        scoring.label_logits(model, cands.subset(range(min(8, cands.n_examples))), args.batch, pad, args.device)

        seqs, conts = cands.sequences()

        def per_sequence() -> np.ndarray:
            with torch.inference_mode():
                out = [scoring.sequence_logprob(model, [ids], [c], pad, args.device)[0]
                       for ids, c in zip(seqs, conts)]
            sync()
            return np.asarray(out).reshape(-1, len(LABELS))

        results = {}
        rows = [("one example at a time, plain", lambda: results.__setitem__("seq", per_sequence())),
                ("one example at a time, shared prompt", lambda: results.__setitem__(
                    "one", scoring.label_logits(model, cands, 1, pad, args.device))),
                (f"batched, {args.batch} examples per call", lambda: results.__setitem__(
                    "batched", scoring.label_logits(model, cands, args.batch, pad, args.device)))]
        # round-robin repeats, best time per method: other load on the machine only ever adds time
        runs = [[] for _ in rows]
        for _ in range(args.repeat):
            for times, (_, fn) in zip(runs, rows):
                times.append(timed(fn))
        seconds = [min(times) for times in runs]
        agree = float(np.abs(results["batched"] - results["seq"]).max())

    base = seconds[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, model {args.model}")
    print(f"{args.examples} examples x {len(LABELS)} labels, best of {args.repeat} round-robin runs; "
          f"max |batched - per-sequence| score difference "
          f"{agree:.2e} nats")
    print(f"{'method':<40} {'seconds':>9} {'examples/s':>11} {'speed-up':>9}")
    for (name, _), s in zip(rows, seconds):
        print(f"{name:<40} {s:>9.2f} {args.examples / s:>11.1f} {base / s:>8.1f}x")


if __name__ == "__main__":
    main()
