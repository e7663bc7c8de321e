"""The models an evaluation compares: one base model in memory with the tuned adapter (and the previous
version's adapter when there is one) attached; switching between them costs nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from handlers.modelio import load_causal_lm, load_tokenizer, resolve_base_model
from trainbox.errors import StageFailed
from trainbox.protocol import TrainSummary

log = logging.getLogger(__name__)
TUNED, BASE, PREVIOUS = "tuned", "base", "previous"


@dataclass
class EvalModels:
    model: Any  # a PeftModel
    tokenizer: Any
    device: str
    variants: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it is not evaluated

    @contextlib.contextmanager
    def use(self, variant: str) -> Iterator[Any]:
        """The model with ``variant``'s weights active: the tuned adapter, none (base), or the previous one."""
        if variant == BASE:
            with self.model.disable_adapter():
                yield self.model
            return
        self.model.set_adapter("default" if variant == TUNED else PREVIOUS)
        try:
            yield self.model
        finally:
            self.model.set_adapter("default")


def base_model_path(ctx: Any) -> str:
    """Where the base model was loaded from: the folder train used, else the job's ``base_model`` resolved."""
    train = ctx.summary_of("train", TrainSummary)
    return (train and train.base_model_path) or resolve_base_model(ctx.job.base_model, ctx.home)


def _dtype(device: str) -> Any:
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _previous_adapter(ctx: Any) -> tuple[Path | None, str | None]:
    """The previous version's adapter directory, or why it cannot be compared."""
    prev = ctx.previous_model
    if not prev:
        return None, None
    label = f"{prev.get('name')}:{prev.get('version')}"
    adapter = (prev.get("artifacts") or {}).get("adapter")
    if not adapter or not (Path(adapter) / "adapter_config.json").exists():
        return None, f"{label} has no adapter on disk ({adapter or 'none recorded'})"
    if prev.get("base_model") not in (None, ctx.job.base_model):
        return None, f"{label} was trained on {prev.get('base_model')}, this model on {ctx.job.base_model}"
    return Path(adapter), None


def load_models(ctx: Any) -> EvalModels:
    from peft import PeftModel

    try:
        adapter = ctx.input_artifact("train", "adapter")
        tokenizer_dir = ctx.input_artifact("train", "tokenizer")
    except KeyError as exc:
        raise StageFailed(f"the train stage recorded no adapter or tokenizer ({exc}); run the train stage "
                          "before evaluate (stages: [prepare, train, evaluate])") from exc
    device = ctx.device if ctx.device else "cpu"
    tokenizer = load_tokenizer(tokenizer_dir)
    base = load_causal_lm(base_model_path(ctx), device=device, dtype=_dtype(device))
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="default")
    model.eval()
    variants = [TUNED] + ([BASE] if ctx.job.evaluate.compare_base else [])
    skipped: dict[str, str] = {}
    if not ctx.job.evaluate.compare_base:
        skipped[BASE] = "evaluate.compare_base is false"
    previous, why = _previous_adapter(ctx)
    if previous is not None:
        try:
            model.load_adapter(str(previous), adapter_name=PREVIOUS)
            variants.append(PREVIOUS)
        except (RuntimeError, ValueError, OSError, json.JSONDecodeError) as exc:  # shape mismatch, bad files
            why = f"adapter {previous} does not load on this base model: {exc}"
    if why:
        log.warning("previous version not compared: %s", why)
        skipped[PREVIOUS] = why
    model.set_adapter("default")
    return EvalModels(model, tokenizer, device, variants, skipped)
