"""The train stage, top to bottom: plan, data, model, resume, loop, outputs."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers import diskspace
from handlers.context import StageContext
from handlers.modelio import load_tokenizer, resolve_base_model
from handlers.train import data, distributed, fsdp, metrics, progress, ranks, rendering
from handlers.train.checkpoints import newest_complete_checkpoint
from handlers.train.distributed import World
from handlers.train.loop import Flags, TrainRun, train_loop
from handlers.train.model import build_model, packing_is_exact
from handlers.train.monitor import UpdateMonitor
from handlers.train.objective import Objective
from handlers.train.observers import Observers
from handlers.train.pruning import Pruned, pruning_check
from handlers.train.plan import make_plan, resolve_device, total_steps
from handlers.train.trainstate import TrainState, apply_training_state, read_training_state
from trainbox.errors import StageFailed
from trainbox.fsio import fsync_dir, fsync_tree
from trainbox.preflight import train_problems
from trainbox.protocol import StageResult

log = logging.getLogger(__name__)
# peft imports bitsandbytes, whose CPU backend logs a warning about optional kernels that LoRA never uses
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft vs transformers 5

CHECKPOINTS = "checkpoints"
EVAL_MAX_ROWS = 512  # in-training eval loss; the evaluate stage scores the whole test split
NON_MATH_KEYS = ("checkpoint", "progress_log", "monitor", "tensorboard", "device", "distributed")


def configure_torch(device: str, threads: int) -> None:
    """CPU threads from the plan, and deterministic kernels (exact resume depends on them)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every new tensor cost more than the math


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_file(ctx: StageContext, name: str) -> Path:
    """A split file of prepare; the train split of augment instead when the job has it (val/test stay original)."""
    if name == "train" and "augment" in ctx.job.stages:
        return ctx.input_artifact("augment", "train")
    try:
        return ctx.input_artifact("prepare", name)
    except KeyError:
        if "prepare" not in ctx.stage_dirs:
            raise StageFailed("the train stage reads the prepare stage's splits; add prepare to the job's stages") from None
        return ctx.input_dir("prepare") / "splits" / f"{name}.jsonl"


def fingerprint(ctx: StageContext, files: list[Path]) -> str:
    """What decides the numbers of a run: train settings, seed, base model and data (not timers or paths)."""
    train = ctx.job.train.model_dump(exclude=set(NON_MATH_KEYS))
    digest = hashlib.sha256(json.dumps([train, ctx.job.seed, ctx.job.base_model], sort_keys=True).encode())
    for path in files:
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:16]


def save_outputs(stage_dir: Path, model: Any, tokenizer: Any,
                 adapter_state: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Final adapter and tokenizer folders, each written aside and renamed into place. ``adapter_state``: the
    whole trainable weights when the model is sharded (FSDP)."""
    out = []
    for name, obj, kwargs in (("adapter", model, {"state_dict": adapter_state}), ("tokenizer", tokenizer, {})):
        target, tmp = stage_dir / name, stage_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp, **kwargs)  # state_dict None: PEFT reads the model's own
        fsync_tree(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        out.append(target)
    fsync_dir(stage_dir)
    return out[0], out[1]


def load_rows(ctx: StageContext,
              tokenizer: Any) -> tuple[list[data.Encoded], list[data.Encoded], list[Path], list[str]]:
    """Encoded train/val rows, the split files, and warnings about how the data was rendered (also sent as events)."""
    spec = ctx.job.train
    train_file, val_file = split_file(ctx, "train"), split_file(ctx, "val")
    train_examples = data.read_split(train_file)
    warnings = [w for w in (rendering.tool_warning(tokenizer, train_examples, "train split"),) if w]
    for warning in warnings:
        log.warning("%s", warning)
        ctx.emit_event("data_warning", warning)
    learn_chosen = spec.preference.learn_chosen
    train_rows = data.encode_split(tokenizer, train_examples, spec.max_seq_length, "train", learn_chosen)
    val_rows = (data.encode_split(tokenizer, data.read_split(val_file), spec.max_seq_length, "val", learn_chosen)
                if val_file.exists() else [])
    if not train_rows:
        raise StageFailed(f"{train_file}: no training rows; add rows to the dataset or lower prepare.split.val/test")
    log_terms(train_rows, Objective.of(spec), train_file)
    return train_rows, val_rows, [train_file, val_file], warnings


def log_terms(rows: list[data.Encoded], objective: Objective, train_file: Path) -> None:
    """Say which loss terms this data feeds and with what weight; fail when no weighted term has rows."""
    units = {name: sum(1 for r in rows if r.rejected is None and r.term == k) for k, name in enumerate(data.TERMS)}
    units["contrastive"] = sum(1 for r in rows if r.rejected is not None)
    weights = dict(zip(data.TERMS, objective.weights), contrastive=objective.contrastive)
    log.info("loss terms: %s", ", ".join(f"{name} x{weights[name]:g} ({n} rows)" for name, n in units.items()))
    learned_chosen = sum(1 for r in rows if r.rejected is not None and r.term != data.NOT_A_TARGET)
    if learned_chosen:
        log.info("%d chosen answer(s) of preference pairs are also generation targets", learned_chosen)
    if not any(weights[name] > 0 and (n or (name == "generation" and learned_chosen)) for name, n in units.items()):
        raise StageFailed(f"{train_file}: nothing to learn: every loss term with rows has weight 0 "
                          f"({', '.join(f'{k} {n} rows' for k, n in units.items() if n)}); raise "
                          "train.loss_weights for those terms")


def resume_or_start(root: Path, model: Any, optimizer: Any, scheduler: Any, fresh: TrainState,
                    world: World = World()) -> tuple[TrainState, int | None]:
    """The newest complete checkpoint's state (loaded into model/optimizer/scheduler/RNG) and its step, else fresh.

    Rank 0 alone reads (and sets broken checkpoints aside) and sends what it read to the other ranks, which
    need no access to its disk; the rank count may differ from the run that wrote the checkpoint.
    """
    saved = None
    if world.is_main:
        checkpoint = newest_complete_checkpoint(root)
        saved = read_training_state(checkpoint) if checkpoint is not None else None
    saved = distributed.share_from_main(world, saved)
    if saved is None:
        return fresh, None
    state = apply_training_state(saved, model, optimizer, scheduler)
    if state.fingerprint != fresh.fingerprint and world.is_main:
        log.warning("checkpoint %s was made with other settings or data; resuming anyway, but the result "
                    "will not match a fresh run", saved["name"])
    log.info("resuming from %s (step %d)", saved["name"], state.step)
    return state, state.step


def run_train(ctx: StageContext) -> StageResult:
    world = distributed.world_from_env()
    device = distributed.rank_device(resolve_device(ctx.job.train, ctx.device), world)
    problems = train_problems(ctx.job.train, cuda_available=device.startswith("cuda"))
    if problems:
        raise StageFailed("; ".join(p.sentence() for p in problems))  # before any model is built or loaded
    distributed.start(world, device)
    try:
        return _train(ctx, world)
    finally:
        distributed.stop(world)


def _train(ctx: StageContext, world: World) -> StageResult:
    spec, stage_dir = ctx.job.train, ctx.stage_dir
    started = time.time()
    base = distributed.local_first(world, "loading the base model",
                                   lambda: resolve_base_model(ctx.job.base_model, ctx.home))
    plan = make_plan(spec, ctx.device, base)
    sharded = world.enabled and spec.distributed.strategy == "fsdp"
    if sharded and plan.method == "qlora":
        raise StageFailed(f"train.method auto chose QLoRA here ({plan.reason}), and fsdp cannot shard 4-bit "
                          "weights; set train.method: lora (fsdp shards the bf16 weights) or strategy: ddp")
    # ranks on one machine share its cores
    configure_torch(plan.device, max(1, plan.cpu_threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    seed_everything(ctx.job.seed)  # before the LoRA init, which draws from the torch RNG

    tokenizer = load_tokenizer(base)
    train_rows, val_rows, files, warnings = load_rows(ctx, tokenizer)
    pad_id = tokenizer.pad_token_id
    batches = data.StepBatches(train_rows, spec.batch_size, spec.gradient_accumulation_steps, ctx.job.seed, pad_id,
                               plan.token_budget, rank=world.rank, world=world.size)
    steps = total_steps(spec, len(train_rows))

    from transformers import get_scheduler

    model = build_model(base, plan, spec.lora)
    batches.packed = packing_is_exact(model, train_rows, plan.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate,
                                  weight_decay=spec.weight_decay)
    scheduler = get_scheduler(spec.lr_scheduler, optimizer, num_warmup_steps=math.ceil(spec.warmup_ratio * steps),
                              num_training_steps=steps)
    state, resumed_from = resume_or_start(stage_dir / CHECKPOINTS, model, optimizer, scheduler,
                                          TrainState(fingerprint=fingerprint(ctx, files)), world)
    # after the resume: FSDP shards what the checkpoint put back and moves the optimizer onto the shards
    wrapper = (fsdp.shard(model, optimizer, world, plan.device) if sharded
               else distributed.wrap(model, world, plan.device))
    run = TrainRun(
        model=model, optimizer=optimizer, scheduler=scheduler, batches=batches,
        val_batches=data.eval_batches(val_rows[:EVAL_MAX_ROWS], batches), state=state,
        metrics=metrics.MetricsLog(stage_dir, state.history, write=world.is_main),
        monitor=UpdateMonitor(model, spec.monitor.every_n_steps),
        flags=Flags(), device=plan.device, total_steps=steps, max_grad_norm=spec.max_grad_norm,
        eval_every=spec.eval_every_steps, checkpoint_root=stage_dir / CHECKPOINTS, keep=spec.checkpoint.keep,
        every_steps=spec.checkpoint.every_steps, objective=Objective.of(spec), world=world, seed=ctx.job.seed,
        ddp=wrapper, sharded=sharded,
        # ranks must stop at the same step: a distributed trial is not pruned (it runs to the end)
        should_prune=None if world.enabled else pruning_check(ctx))
    state.history = run.metrics.history  # the checkpoint carries the rows written so far
    if world.enabled:
        run.report_rank = ranks.reporter(stage_dir, world, plan.device, run.system)
    if not world.is_main:  # rank 0 writes progress, metrics, checkpoints and outputs
        train_loop(ctx, run)
        if sharded:
            fsdp.gather(model, None, world)  # rank 0 writes the adapter these shards make up
        return StageResult(summary={"rank": world.rank, "world_size": world.size, "steps": run.state.step},
                           message=f"rank {world.rank} of {world.size} trained {run.state.step} steps; node 0's "
                                   "rank 0 wrote the adapter")
    observers = Observers.start(ctx, run)
    try:
        train_loop(ctx, run)
    except Pruned as pruned:
        return pruned_result(run, pruned)
    finally:
        observers.stop()
        run.metrics.close()
    whole = fsdp.gather(model, None, world) if sharded else None
    result = diskspace.until_written(
        "the adapter, metrics and report",
        lambda: finish(ctx, run, plan, base, tokenizer, started, resumed_from, len(train_rows), len(val_rows),
                       warnings, whole.adapter if whole else None),
        ctx.should_stop)
    if diskspace.summary():
        ctx.emit_event("resource_warning", diskspace.summary(), resource="disk")
    return result


def pruned_result(run: TrainRun, pruned: Pruned) -> StageResult:
    """A sweep trial its pruner stopped: no adapter, the step and loss it stopped at (the metrics files stay)."""
    run.metrics.write_csv()
    message = f"pruned at step {pruned.step} of {run.total_steps} (eval loss {pruned.eval_loss:.4f})"
    return StageResult(summary={"pruned_at_step": pruned.step, "final_eval_loss": pruned.eval_loss,
                                "total_steps": run.total_steps, "train_seconds": round(run.state.train_seconds, 3)},
                       artifacts={"metrics_jsonl": metrics.JSONL, "metrics_csv": metrics.CSV,
                                  "checkpoints": CHECKPOINTS},
                       message=message, skip_rest=f"the trial was {message}")


def finish(ctx: StageContext, run: TrainRun, plan: Any, base: str, tokenizer: Any, started: float,
           resumed_from: int | None, n_train: int, n_val: int, warnings: list[str],
           adapter_state: dict[str, Any] | None = None) -> StageResult:
    stage_dir, state, history = ctx.stage_dir, run.state, run.metrics.history
    save_outputs(stage_dir, run.model, tokenizer, adapter_state)
    run.metrics.ensure_complete()
    run.metrics.write_csv()
    metrics.plot_curves(history, stage_dir / metrics.PLOT)
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in history if r.get("eval_loss") is not None]
    final = history[-1] if history else {}
    last = {"epoch": state.epoch, "step": state.step, "total_steps": run.total_steps, "loss": final.get("loss"),
            "learning_rate": final.get("learning_rate"),
            "samples_per_s": round(state.samples_seen / max(state.train_seconds, 1e-9), 3),
            "tokens_per_s": round(state.tokens_seen / max(state.train_seconds, 1e-9), 2), "eta_s": 0.0}
    run.write_progress_log(last)
    ctx.report_progress(force=True, **last)
    files = {"adapter": "adapter", "tokenizer": "tokenizer", "checkpoints": CHECKPOINTS,
             "metrics_jsonl": metrics.JSONL, "metrics_csv": metrics.CSV, "plot": metrics.PLOT,
             "progress_summary": progress.SUMMARY}
    summary = {
        "base_model_path": base, "total_steps": run.total_steps, "final_loss": final.get("loss"),
        "min_loss": min(losses) if losses else None, "final_eval_loss": evals[-1] if evals else None,
        "final_loss_terms": {t: next((r[t] for r in reversed(history) if r.get(t) is not None), None)
                             for t in metrics.LOSS_TERMS},
        "loss_weights": ctx.job.train.loss_weights.model_dump(),
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_s": round(state.tokens_seen / max(state.train_seconds, 1e-9), 2),
        "resumed_from_step": resumed_from, "method": plan.method, "device": plan.device, "dtype": plan.dtype,
        "ranks": run.world.size, "strategy": ("fsdp" if run.sharded else "ddp") if run.world.enabled else None,
        "gradient_checkpointing": plan.gradient_checkpointing, "train_rows": n_train, "val_rows": n_val,
        "checkpoint_seconds": round(run.checkpoint_seconds, 3), "checkpoints_written": len(run.checkpoints_written),
        "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        "modules_not_learning": run.monitor.summary()["modules_not_learning"], "data_warnings": warnings}
    config = {"job": ctx.job.model_dump(mode="json"), "plan": asdict(plan), "base_model_path": base}
    report_path, summary_csv = metrics.write_report(
        stage_dir, history, config, started, time.time(), run.total_steps, files,
        {"summary": summary, "monitor": run.monitor.summary(),
         "checkpoints": [c.path.name for c in run.checkpoints_written]})
    files["report"] = str(report_path.relative_to(stage_dir))
    files["summary_csv"] = str(summary_csv.relative_to(stage_dir))
    loss_text = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
    message = f"trained {run.total_steps} steps ({plan.method}, {plan.device}), final loss {loss_text}"
    return StageResult(summary=summary, artifacts=files, message="; ".join([message, *warnings]),
                       model={"train_loss": summary["final_loss"], "base_model": ctx.job.base_model},
                       model_artifacts={"adapter": "adapter"})
