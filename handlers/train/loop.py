"""The training loop: one optimizer step at a time, with checkpoints, evals and stops at step boundaries.

Timers (APScheduler) and signals only raise flags; all saving happens here between steps, so a checkpoint
always describes a state the loop really passed through.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from handlers.context import StageContext
from handlers.diskspace import best_effort, out_of_space, skipped, until_written
from handlers.train import distributed, fsdp
from handlers.train.checkpoints import Checkpoint, rotate_checkpoints, write_checkpoint_atomically
from handlers.train.data import StepBatches, real_tokens, to_batches
from handlers.train.distributed import World
from handlers.train.metrics import LOSS_TERMS, MetricsLog
from handlers.train.monitor import UpdateMonitor
from handlers.train.objective import Objective, StepCounts, micro_loss, micro_terms, step_record, step_sums
from handlers.train.objective import token_loss_sum as token_loss_sum  # the validation loss; tests use it
from handlers.train.pruning import Pruned
from handlers.train.trainstate import TrainState, save_training_state
from trainbox.errors import StageFailed, StopRequested

log = logging.getLogger(__name__)


@dataclass
class Flags:
    """Raised by timers and read by the loop at the next step boundary."""

    checkpoint_due: threading.Event = field(default_factory=threading.Event)
    progress_due: threading.Event = field(default_factory=threading.Event)


@dataclass
class TrainRun:
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: StepBatches
    val_batches: list[dict[str, torch.Tensor]]
    state: TrainState
    metrics: MetricsLog
    monitor: UpdateMonitor
    flags: Flags
    device: str
    total_steps: int
    max_grad_norm: float
    eval_every: int | None
    checkpoint_root: Path
    keep: int
    every_steps: int | None
    objective: Objective = Objective((1.0, 0.0, 0.0), 0.0, 2.0, 0.5)
    world: World = World()
    ddp: Any = None  # DDP (distributed.wrap) or the FSDP root (fsdp.shard) around the model on several ranks
    sharded: bool = False  # FSDP: checkpoints gather the shards on every rank first
    seed: int = 0
    report_rank: Callable[[int], None] = lambda step: None  # distributed: this rank's status file
    write_progress_log: Callable[[dict[str, Any]], None] = lambda fields: None
    on_row: Callable[[dict[str, Any]], None] = lambda row: None
    on_event: Callable[..., None] = lambda kind, message, **data: None
    should_prune: Callable[[int, float], bool] | None = None  # a sweep trial's pruner, asked after each eval
    system: dict[str, Any] = field(default_factory=dict)  # latest CPU/RAM/GPU snapshot (background sampler)
    checkpoints_written: list[Checkpoint] = field(default_factory=list)
    checkpoint_seconds: float = 0.0


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _backward(run: TrainRun, micro: list[dict[str, torch.Tensor]], counts: StepCounts, weight: int) -> list[Any]:
    """Forward and backward of this rank's micro-batches; their loss terms.

    Under DDP only the last backward syncs gradients (the others run in ``no_sync``), and every loss is scaled
    by the rank count because DDP averages where the step needs the sum over ranks.
    """
    parts = []
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        with run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext():
            batch = _to(mb, run.device)
            part = (run.ddp(micro_terms, batch, run.objective) if run.ddp is not None
                    else micro_terms(run.model, batch, run.objective))
            (micro_loss(part, counts, run.objective) * weight).backward()
        parts.append(part)
    return parts


def _step_among_ranks(run: TrainRun) -> dict[str, Any]:
    """``train_step`` where a failed collective (DDP's syncs, the loss sums) means a peer rank is gone."""
    try:
        return train_step(run, run.state.step)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        log.error("step %d failed on rank %d:\n%s", run.state.step + 1, run.world.rank, traceback.format_exc())
        raise distributed.lost_rank(f"training step {run.state.step + 1}", exc) from exc


def train_step(run: TrainRun, step: int) -> dict[str, Any]:
    """One optimizer step over its micro-batches; the loss is the weighted sum of the terms (``objective``),
    each a mean over the whole step, so grouping rows into micro-batches (or ranks) never changes it."""
    micro = run.batches.micro_batches(step)
    # the divisors count the whole step, every rank's rows
    counts = StepCounts.of(run.batches.step_micro_batches(step) if run.world.enabled else micro)
    lr = run.scheduler.get_last_lr()[0]
    weight = run.world.size
    if not micro:  # fewer rows than ranks at an epoch's end: a zero-weighted pass keeps this rank in DDP's sync
        b = run.batches
        micro, weight = to_batches(b.step_rows(step)[:1], b.token_budget, b.packed, b.pad_id), 0
    parts = _backward(run, micro, counts, weight)
    local = step_sums(parts) + [sum(real_tokens(mb) for mb in micro)]
    if not weight:
        local = [0.0] * len(local)
    *sums, tokens = distributed.sum_over_ranks(run.world, local, run.device)
    record = step_record(sums, counts, run.objective)
    run.monitor.after_backward()
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = fsdp.whole_norm(torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**record, "learning_rate": lr, "grad_norm": grad_norm,
            "tokens": int(tokens), "samples": len(run.batches.step_rows(step))}


@torch.no_grad()
def evaluate_loss(model: Any, batches: list[dict[str, torch.Tensor]], device: str,
                  world: World = World(), root: Any = None) -> float | None:
    """Token-mean loss over the target tokens of the validation batches (dropout off; no RNG is consumed);
    None when they have none (pairs whose chosen answers are not learned). Ranks share the batches; a
    sharded model is called through its FSDP ``root``, which gathers the weights."""
    model.eval()
    total, count = 0.0, 0
    mine = batches[world.rank::world.size]
    # a sharded forward is a collective: every rank runs as many, the ones past its share are discarded
    rounds = math.ceil(len(batches) / world.size) if root is not None and batches else len(mine)
    for i in range(rounds):
        b = _to(mine[i] if i < len(mine) else batches[0], device)
        loss_sum, n = root(token_loss_sum, b) if root is not None else token_loss_sum(model, b)
        if i < len(mine):
            total, count = total + float(loss_sum), count + n
    model.train()
    total, count = distributed.sum_over_ranks(world, [total, count], device)
    return total / count if count else None


def _write_checkpoint(run: TrainRun, kind: str, gathered: fsdp.Gathered | None) -> Checkpoint:
    return write_checkpoint_atomically(
        run.checkpoint_root, run.state.step, kind,
        lambda folder: save_training_state(folder, run.model, run.optimizer, run.scheduler, run.state, gathered),
        extra={"epoch": run.state.epoch, "index_in_epoch": run.state.index_in_epoch,
               "fingerprint": run.state.fingerprint})


def save_checkpoint(run: TrainRun, kind: str, should_stop: Callable[[], bool] = lambda: False,
                    gathered: fsdp.Gathered | None = None) -> Checkpoint | None:
    """Write a checkpoint (rank 0; under FSDP from what ``gather_for_checkpoint`` collected). A full disk never
    fails the run: a rolling, epoch or emergency checkpoint is skipped (resume then starts from the one before),
    the final one waits for free space."""
    started = time.monotonic()
    try:
        if kind == "final":
            checkpoint = until_written(f"the final checkpoint (step {run.state.step})",
                                       lambda: _write_checkpoint(run, kind, gathered), should_stop)
        else:
            checkpoint = _write_checkpoint(run, kind, gathered)
    except OSError as exc:
        message = (f"checkpoint at step {run.state.step} could not be written ({exc}); free disk space under "
                   f"{run.checkpoint_root} or lower train.checkpoint.keep")
        if kind != "rolling" and not out_of_space(exc):
            raise StageFailed(message) from exc
        if out_of_space(exc):
            skipped[f"{kind} checkpoint"] += 1
        log.error("%s; %s", message, "the stage stops and resumes from the checkpoint before" if kind == "emergency"
                  else "training continues, the next checkpoint tries again")
        run.on_event("resource_warning", message, resource="disk")
        return None
    best_effort("checkpoint rotation", lambda: rotate_checkpoints(run.checkpoint_root, run.keep))
    best_effort("training metrics CSV", run.metrics.write_csv)
    elapsed = time.monotonic() - started
    run.checkpoint_seconds += elapsed
    run.checkpoints_written.append(checkpoint)
    log.info("checkpoint %s (%s) written in %.2f s", checkpoint.path.name, kind, elapsed)
    return checkpoint


def _checkpoint_kind(run: TrainRun, epoch_end: bool) -> str | None:
    step = run.state.step
    if step == run.total_steps:
        return "final"
    if epoch_end:
        return "epoch"
    if run.every_steps and step % run.every_steps == 0:
        return "rolling"
    if run.flags.checkpoint_due.is_set():
        return "rolling"
    return None


def gather_for_checkpoint(run: TrainRun) -> fsdp.Gathered | None:
    """Under FSDP every rank takes part in collecting the whole state for rank 0; otherwise nothing to do."""
    return fsdp.gather(run.model, run.optimizer, run.world) if run.sharded else None


def progress_fields(run: TrainRun, row: dict[str, Any], step_seconds: float) -> dict[str, Any]:
    remaining = run.total_steps - run.state.step
    return {"epoch": row["epoch"], "step": run.state.step, "total_steps": run.total_steps, "loss": row["loss"],
            **{k: row[k] for k in LOSS_TERMS}, "learning_rate": row["learning_rate"],
            "samples_per_s": row["samples_per_s"],
            "tokens_per_s": row["tokens_per_s"], "eta_s": round(remaining * step_seconds, 1)}


def train_loop(ctx: StageContext, run: TrainRun) -> None:
    """Run steps until ``total_steps``; on a stop request save an emergency checkpoint and raise StopRequested."""
    run.model.train()
    log.info("micro-batches %s, at most %d tokens per forward pass", "packed without padding" if run.batches.packed
             else "padded in length-sorted groups", run.batches.token_budget)
    step_seconds = None
    while run.state.step < run.total_steps:
        if distributed.agree(run.world, ctx.should_stop(), run.device):  # every rank stops at the same boundary
            gathered = gather_for_checkpoint(run)
            saved = save_checkpoint(run, "emergency", gathered=gathered) if run.world.is_main else None
            distributed.wait_for_all(run.world, "waiting for the emergency checkpoint")
            raise StopRequested(f"stopped at step {run.state.step}/{run.total_steps}; " + (
                "resume continues from here" if saved else "resume starts from the newest checkpoint written before"))
        started = time.monotonic()
        epoch, index = run.batches.position(run.state.step)
        distributed.seed_step(run.seed, run.state.step, run.world)
        out = _step_among_ranks(run) if run.world.enabled else train_step(run, run.state.step)
        elapsed = time.monotonic() - started
        step_seconds = elapsed if step_seconds is None else 0.9 * step_seconds + 0.1 * elapsed
        state = run.state
        state.step += 1
        state.epoch, state.index_in_epoch = run.batches.position(state.step)
        state.tokens_seen += out["tokens"]
        state.samples_seen += out["samples"]
        state.train_seconds += elapsed
        epoch_end = index + 1 == run.batches.steps_per_epoch
        row = {"step": state.step, "epoch": round(epoch + (index + 1) / run.batches.steps_per_epoch, 4),
               "loss": out["loss"], **{k: out[k] for k in (*LOSS_TERMS, "preference_accuracy")},
               "learning_rate": out["learning_rate"], "grad_norm": out["grad_norm"],
               "tokens_per_s": round(out["tokens"] / elapsed, 2), "samples_per_s": round(out["samples"] / elapsed, 3),
               "elapsed_s": round(state.train_seconds, 3), "time": time.time()}
        due_eval = (run.eval_every and state.step % run.eval_every == 0) or epoch_end or state.step == run.total_steps
        if run.val_batches and due_eval:
            row["eval_loss"] = evaluate_loss(run.model, run.val_batches, run.device, run.world,
                                             run.ddp if run.sharded else None)
            row["perplexity"] = math.exp(min(row["eval_loss"], 50.0)) if row["eval_loss"] is not None else None
        run.report_rank(state.step)
        kind = _checkpoint_kind(run, epoch_end) if run.world.is_main else None
        gathered = None
        if run.sharded:  # rank 0's timers decide; every rank gathers
            kind = distributed.share_from_main(run.world, kind)
            gathered = gather_for_checkpoint(run) if kind else None
        if not run.world.is_main:
            run.metrics.history.append(row)  # kept for the step count; rank 0 writes every file
            continue
        run.metrics.append(row)
        run.on_row(row)
        fields = progress_fields(run, row, step_seconds)
        ctx.report_progress(**fields, **{k: v for k, v in run.system.items() if k != "gpus"})
        run.monitor.after_step(state.step)
        if kind:
            run.flags.checkpoint_due.clear()
            save_checkpoint(run, kind, ctx.should_stop, gathered)
        if run.flags.progress_due.is_set():
            run.flags.progress_due.clear()
            run.write_progress_log(fields)
        if run.should_prune and row.get("eval_loss") is not None and run.should_prune(state.step, row["eval_loss"]):
            raise Pruned(state.step, row["eval_loss"])
