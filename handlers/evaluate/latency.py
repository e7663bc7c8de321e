"""Fair latency and throughput A/B between the evaluated models.

Every model runs in its deployed form: the tuned (and previous) adapter merged into the weights as the export
stage ships it, the base with no adapter; both then run exactly the same modules, so only the weights differ.
Same process, same threads, same inputs; an untimed warm-up call before every block; short blocks in alternating
model order (A B, B A, ...) so drift and background load hit every model alike. The spread is reported: p50,
p95 and the interquartile range per model, and a paired block-bootstrap 95% interval of the p50 change.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import psutil

from handlers.evaluate.models import BASE, PREVIOUS, TUNED, EvalModels
from trainbox.errors import StopRequested

log = logging.getLogger(__name__)
BATCH_REPEATS = 3  # timed batched passes per model and round
CHUNK = 5  # examples timed on one model before the other model's turn


@dataclass
class Workload:
    """What one model is timed on: ``single(model, i)`` answers example i alone (one request); ``batched(model)``
    answers all ``n_batched`` timed examples in batches (throughput)."""

    single: Callable[[Any, int], Any]
    batched: Callable[[Any], Any]
    indices: list[int]
    n_batched: int
    what: str


@contextlib.contextmanager
def deployed(models: EvalModels, variant: str) -> Iterator[Any]:
    """The model as deployed: base = adapter disabled; tuned/previous = that adapter merged into the weights.
    Unmerging subtracts the same delta again, exact only up to float rounding (a few ulps after many switches in
    bf16), which is why timing runs after every metric has been computed."""
    if variant == BASE:
        with models.use(BASE) as model:
            yield model
        return
    adapter = "default" if variant == TUNED else PREVIOUS
    models.model.set_adapter(adapter)
    models.model.merge_adapter([adapter])
    try:
        yield models.model
    finally:
        models.model.unmerge_adapter()
        models.model.set_adapter("default")


def _clock(device: str) -> Callable[[], float]:
    if str(device).startswith("cuda"):
        import torch

        def synced() -> float:
            torch.cuda.synchronize()  # the GPU runs ahead of Python: wait for it before reading the clock
            return time.perf_counter()
        return synced
    return time.perf_counter


def _alternating(variants: Sequence[str], k: int) -> list[str]:
    return list(variants) if k % 2 == 0 else list(reversed(variants))


def time_models(models: EvalModels, variants: Sequence[str], work: Workload, rounds: int,
                should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: single-example seconds as a (rounds, examples) array and batched seconds per pass.

    Each round times every example once per model, CHUNK examples at a time with the model order alternating
    from chunk to chunk, so a burst of other work lands on both models; then the batched passes, also in
    alternating order."""
    import torch

    clock = _clock(models.device)
    n = len(work.indices)
    single = {v: np.zeros((rounds, n)) for v in variants}
    batched: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for r in range(rounds):
            for c, first in enumerate(range(0, n, CHUNK)):
                if should_stop is not None and should_stop():
                    raise StopRequested("evaluation stopped; it starts over when the job resumes")
                for variant in _alternating(variants, r + c):
                    with deployed(models, variant) as model:
                        work.single(model, work.indices[first])  # warm-up: caches, allocator, lazy kernels
                        for j in range(first, min(first + CHUNK, n)):
                            start = clock()
                            work.single(model, work.indices[j])
                            single[variant][r, j] = clock() - start
            for variant in _alternating(variants, r):
                with deployed(models, variant) as model:
                    work.batched(model)  # warm-up for the batch shapes
                    for _ in range(BATCH_REPEATS):
                        start = clock()
                        work.batched(model)
                        batched[variant].append(clock() - start)
    return {v: {"single": single[v], "batched": np.asarray(batched[v])} for v in variants}


def latency_stats(single_s: np.ndarray, batched_s: np.ndarray, n_batched: int) -> dict[str, Any]:
    """p50/p95/IQR of single-example latency (ms) and batched throughput (examples/s, median pass)."""
    lat = np.asarray(single_s, dtype=float).ravel() * 1000.0
    return {
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
        "latency_iqr_ms": [float(np.percentile(lat, 25)), float(np.percentile(lat, 75))] if lat.size else None,
        "latency_samples": int(lat.size),
        "examples_per_s": n_batched / float(np.median(batched_s)) if len(batched_s) else None,
    }


def _pct(new: float, ref: float) -> float:
    return (new - ref) / ref * 100.0


def timing_blocks(single: np.ndarray) -> np.ndarray:
    """The single-example times as (blocks, CHUNK): one block is one round's chunk of CHUNK examples, timed
    back to back on one model (the last block NaN-padded when CHUNK does not divide the examples)."""
    single = np.atleast_2d(np.asarray(single, dtype=float))
    rounds, n = single.shape
    per_round = -(-n // CHUNK)
    out = np.full((rounds * per_round, CHUNK), np.nan)
    for r in range(rounds):
        for c, first in enumerate(range(0, n, CHUNK)):
            part = single[r, first:first + CHUNK]
            out[r * per_round + c, :len(part)] = part
    return out


def latency_change(ref: dict[str, np.ndarray], new: dict[str, np.ndarray], samples: int,
                   seed: int) -> dict[str, Any]:
    """Change of the tuned model's p50 latency and throughput against ``ref``, with their spread.

    p50: paired block bootstrap, 95% percentile interval. Background load comes in bursts, so times taken
    back to back move together: resampling single examples would treat a burst as many independent draws
    and state an interval a rerun often misses. Whole blocks (a chunk of one model and the same chunk of the
    other, timed next to each other) are resampled instead.
    Throughput: the range of the per-pass changes (pass k of one model against pass k of the other)."""
    a, b = ref["single"].ravel(), new["single"].ravel()
    blocks_a, blocks_b = timing_blocks(ref["single"]), timing_blocks(new["single"])
    picks = np.random.default_rng(seed).integers(0, len(blocks_a), (samples, len(blocks_a)))
    med_a = np.nanmedian(blocks_a[picks].reshape(samples, -1), axis=1)
    med_b = np.nanmedian(blocks_b[picks].reshape(samples, -1), axis=1)
    draws = (med_b - med_a) / med_a * 100.0
    per_pass = [_pct(1.0 / n, 1.0 / r) for r, n in zip(ref["batched"], new["batched"])]
    latency = {"estimate": _pct(float(np.median(b)), float(np.median(a))),
               "ci_low": float(np.percentile(draws, 2.5)), "ci_high": float(np.percentile(draws, 97.5))}
    throughput = {"estimate": _pct(1.0 / float(np.median(new["batched"])), 1.0 / float(np.median(ref["batched"]))),
                  "low": float(min(per_pass)), "high": float(max(per_pass))}
    return {"latency_p50_change_pct": latency["estimate"], "latency_p50_change": latency,
            "examples_per_s_change_pct": throughput["estimate"], "examples_per_s_change": throughput,
            "directions_agree": directions_agree(latency, throughput)}


def directions_agree(latency: dict[str, float], throughput: dict[str, float]) -> bool:
    """True unless one figure says "faster" and the other "slower" beyond its own spread: a lower latency
    must not come with a clearly lower throughput, and the other way round."""
    lat_faster, lat_slower = latency["ci_high"] < 0, latency["ci_low"] > 0
    thr_faster, thr_slower = throughput["low"] > 0, throughput["high"] < 0
    return not ((lat_faster and thr_slower) or (lat_slower and thr_faster))


def method_note(models: EvalModels, work: Workload, rounds: int, load_1m: float) -> dict[str, Any]:
    """How the timing was done, for the report; ``busy`` when other work competed for the CPU cores, which
    inflates every absolute number (the alternating rounds keep the comparison fair)."""
    import torch

    cores = psutil.cpu_count() or 1
    return {"what": work.what, "device": models.device, "threads": torch.get_num_threads(), "rounds": rounds,
            "examples": len(work.indices), "chunk": CHUNK, "batched_examples": work.n_batched,
            "batch_repeats": BATCH_REPEATS,
            "cpu_cores": cores, "load_1m": round(load_1m, 2), "busy": load_1m > cores,
            "forms": {BASE: "adapter disabled (the base weights)", TUNED: "adapter merged into the weights",
                      PREVIOUS: "its adapter merged into the weights"}}


def load_average() -> float:
    """The 1-minute load average (processes wanting a CPU), read at the end of the timing."""
    return float(psutil.getloadavg()[0])
