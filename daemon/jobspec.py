"""The job YAML schema (pydantic), declared once; everything after ingest receives a ``JobSpec``."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_ORDER = ("prepare", "augment", "train", "evaluate", "export")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")


class Strict(BaseModel):
    """Unknown keys are errors (the loader turns them into did-you-mean hints)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(Strict):
    """Fractions of rows per split; assignment is by content hash, so it is stable when rows are appended."""

    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitSpec":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must add up to 1.0 (they add up to {total:g})")
        return self


class PrepareSpec(Strict):
    split: SplitSpec = SplitSpec()
    shuffle: bool = True
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows (after shuffling).")


class AugmentSpec(Strict):
    """Augmentation settings, read by the augment stage."""

    multiplier: int = Field(1, ge=1, le=20, description="Target size as a multiple of the original rows.")
    techniques: list[Literal["style_transfer", "scenario", "relationship", "hard_negative"]] = Field(
        default_factory=lambda: ["style_transfer", "scenario", "relationship"]
    )
    styles: list[str] = Field(default_factory=list)
    dedup: bool = True
    min_quality: float = Field(0.0, ge=0, le=1)


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = "auto"


class CheckpointSpec(Strict):
    interval_seconds: float = Field(180, gt=0)
    keep: int = Field(5, ge=1)
    every_steps: int | None = Field(None, ge=1, description="Also checkpoint every N optimizer steps.")


class ProgressLogSpec(Strict):
    interval_seconds: float = Field(180, gt=0)


class MonitorSpec(Strict):
    every_n_steps: int = Field(50, ge=1, description="Check that every trainable module was updated.")


class LossWeights(Strict):
    """Weights of the loss terms; rows carry their kind in metadata (augmentation sets it)."""

    generation: float = Field(1.0, ge=0)
    style: float = Field(0.0, ge=0)
    relationship: float = Field(0.0, ge=0)
    contrastive: float = Field(0.0, ge=0)


class TrainSpec(Strict):
    method: Literal["lora", "qlora", "auto"] = "lora"
    bits: Literal[4, 8] = 4
    lora: LoraSpec = LoraSpec()
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(1024, ge=16)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    eval_every_steps: int | None = Field(None, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    checkpoint: CheckpointSpec = CheckpointSpec()
    progress_log: ProgressLogSpec = ProgressLogSpec()
    monitor: MonitorSpec = MonitorSpec()
    loss_weights: LossWeights = LossWeights()
    tensorboard: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class WinnerRule(Strict):
    alpha: float = Field(0.05, gt=0, lt=1)
    critical_recall_may_drop: bool = False
    against: Literal["base", "previous"] = Field(
        "base", description="Reference model; 'previous' falls back to base when there is no previous version.")


class EvaluateSpec(Strict):
    mode: Literal["likelihood", "generate", "both"] = "likelihood"
    critical_label: str | None = "REFUSE"
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    max_examples: int | None = Field(None, gt=0)
    compare_base: bool = True
    bootstrap_samples: int = Field(1000, ge=100)
    winner_rule: WinnerRule = WinnerRule()
    samples: int = Field(5, ge=0, description="Sample generations shown side by side in the report.")
    latency_examples: int = Field(50, ge=1, description="Test examples timed one at a time for latency p50/p95.")


class OllamaSpec(Strict):
    create: Literal["auto", "always", "never"] = "auto"
    system: str | None = None


class ExportSpec(Strict):
    merged: bool = True
    gguf: list[Literal["f16", "bf16", "q8_0", "q4_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    ollama: OllamaSpec = OllamaSpec()
    only_if_winner: bool = False
    verify_prompts: list[str] = Field(default_factory=lambda: ["Hello", "The capital of France is"])


class NotifySpec(Strict):
    on: list[Literal["succeeded", "failed", "interrupted", "waiting", "exported"]] = Field(
        default_factory=lambda: ["succeeded", "failed", "interrupted", "waiting", "exported"]
    )
    speak: bool = False


class SweepParam(Strict):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str | int | float | bool] | None = None


class SweepSpec(Strict):
    trials: int = Field(10, ge=1)
    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    storage: str | None = Field(None, description="RDB URL; default sqlite at state/optuna.db")
    params: dict[str, SweepParam] = Field(default_factory=dict, description="Dotted key path -> search space.")


class JobSpec(Strict):
    name: str = Field(..., min_length=1, max_length=64)
    kind: Literal["pipeline", "sweep"] = "pipeline"
    datasets: list[str] = Field(..., min_length=1)
    base_model: str = "builtin:tiny"
    stages: list[Literal["prepare", "augment", "train", "evaluate", "export"]] = Field(
        default_factory=lambda: ["prepare", "train", "evaluate", "export"]
    )
    seed: int = 42
    prepare: PrepareSpec = PrepareSpec()
    augment: AugmentSpec = AugmentSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    export: ExportSpec = ExportSpec()
    notify: NotifySpec = NotifySpec()
    sweep: SweepSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return v

    @field_validator("datasets", mode="before")
    @classmethod
    def _one_dataset(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each stage may appear once")
        if v != sorted(v, key=STAGE_ORDER.index):
            raise ValueError(f"stages must be in pipeline order: {', '.join(STAGE_ORDER)}")
        if v and v[0] != "prepare":
            v = ["prepare", *v]  # every later stage reads prepare's splits
        return v

    @model_validator(mode="after")
    def _kind_sections(self) -> "JobSpec":
        if self.kind == "sweep" and self.sweep is None:
            raise ValueError("kind: sweep needs a 'sweep:' section (trials, metric, params)")
        if self.kind == "pipeline" and self.sweep is not None:
            raise ValueError("a 'sweep:' section needs 'kind: sweep'")
        return self
