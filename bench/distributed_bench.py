"""One process against N ranks (DDP, then FSDP, through torchrun), the same train job side by side in one run.

    python bench/distributed_bench.py              # CPU: 1 process vs 2 gloo ranks, builtin tiny model
    python bench/distributed_bench.py --gpus 4     # CUDA: 1 GPU vs 4 GPUs over NCCL (needs a machine with them)

Both sides train the same rows in the same order with the same global batch (``batch_size`` rows per step over
all ranks), so their per-step losses must agree up to floating-point summation order; the table shows the
largest difference for each. Throughput is the train stage's own counter (non-pad tokens over its training time,
startup excluded) and, separately, the wall time of the whole stage process including torchrun and the
ranks' start. Scaling efficiency = (tokens/s with N) / (N x tokens/s with 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from daemon.launch import stage_command  # noqa: E402
from train_fixtures import demo_examples, make_train_stage, metric_rows, split_by_hash  # noqa: E402
from trainbox.jobspec import TrainSpec  # noqa: E402


def machine(gpus: int) -> str:
    import torch

    gpu = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus and torch.cuda.is_available() else "no GPU used"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run_once(root: Path, train: dict[str, Any], ranks: int, home: Path) -> dict[str, Any]:
    """One train stage; its throughput, wall time and per-step losses."""
    stage = make_train_stage(root, split_by_hash(demo_examples()), train, home=home)
    if ranks > 1:
        command = stage_command("train", stage, TrainSpec.model_validate(train), ranks, "bench", 60)
    else:
        command = [sys.executable, "-m", "handlers", "train", str(stage)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if train["device"] == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(ranks))
    started = time.monotonic()
    with open(root / "stage.log", "wb") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"{ranks} rank(s) exited {code}; see {root / 'stage.log'}")
    summary = json.loads((stage / "result.json").read_text())["summary"]
    return {"ranks": ranks, "strategy": train["distributed"].get("strategy", "ddp"), "wall_s": wall,
            "train_s": summary["train_seconds"],
            "tokens_per_s": summary["tokens_per_s"], "losses": [r["loss"] for r in metric_rows(stage)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many (NCCL); 0 = CPU, gloo")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks to compare with one process (gloo)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    n = args.gpus or args.ranks
    train = {"max_steps": args.steps, "batch_size": 8 * n, "max_seq_length": 128, "learning_rate": 5e-3,
             "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "device": "cuda" if args.gpus else "cpu",
             "checkpoint": {"interval_seconds": 3600}, "distributed": {"devices": n}}
    one = {**train, "distributed": {"devices": 1}}
    with tempfile.TemporaryDirectory(prefix="trainbox-dist-bench-") as tmp:
        home = Path(tmp) / "home"
        sharded = {**train, "distributed": {"devices": n, "strategy": "fsdp"}}
        results = [run_once(Path(tmp) / "one", one, 1, home), run_once(Path(tmp) / "ddp", train, n, home),
                   run_once(Path(tmp) / "fsdp", sharded, n, home)]
    base = results[0]
    backend = "NCCL" if args.gpus else "gloo"
    print(f"machine: {machine(args.gpus)}")
    print(f"job: builtin:tiny, {args.steps} steps, {train['batch_size']} rows per step, "
          f"{'GPU' if args.gpus else 'CPU'}\n")
    print("| setup | train s | tokens/s | tokens/s vs 1 | scaling efficiency | stage wall s | max loss diff vs 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        label = "1 process" if r["ranks"] == 1 else f"{r['ranks']} ranks {r['strategy'].upper()} ({backend})"
        diff = max(abs(a - b) for a, b in zip(base["losses"], r["losses"]))
        print(f"| {label} | {r['train_s']:.1f} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | "
              f"{ratio / r['ranks']:.0%} | {r['wall_s']:.1f} | {diff:.1e} |")
    print(f"\nper-step losses compared over {len(base['losses'])} steps")


if __name__ == "__main__":
    main()
