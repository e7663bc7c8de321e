"""What a checkpoint holds and how it is restored: adapter, optimizer, scheduler, RNG states, position, history.

Restoring all of it after rebuilding the model the same way makes the next step identical to the one an
uninterrupted run would take (the data position is the global step; see ``data.StepBatches``).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlers.train.checkpoints import Checkpoint
from trainbox.errors import StageFailed

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Counters and history that survive a restart (everything here is JSON)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    index_in_epoch: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    fingerprint: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])]}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def restore_rng(saved: dict[str, Any], tensors: dict[str, Any]) -> None:
    random.setstate(_tupled(saved["python"]))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_training_state(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                        state: TrainState, gathered: Any = None) -> None:
    """Write every file of a checkpoint into ``folder`` (the caller makes it atomic). ``gathered``: an FSDP
    run's whole weights and optimizer state (``fsdp.Gathered``), written in the same format."""
    # state_dict None: PEFT reads the model's own (one process, DDP)
    model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True,
                          state_dict=gathered.adapter if gathered else None)
    torch.save(gathered.optimizer if gathered else optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    torch.save({"torch": torch.get_rng_state(), "cuda": cuda}, folder / "rng.pt")
    payload = {**asdict(state), "rng": capture_rng()}
    (folder / STATE_FILE).write_text(json.dumps(payload), encoding="utf-8")


def read_training_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """Everything a checkpoint holds, as CPU objects (so rank 0 can send it to ranks on other machines)."""
    from safetensors.torch import load_file

    folder = checkpoint.path
    return {"name": folder.name,
            "adapter": load_file(str(folder / ADAPTER_DIR / "adapter_model.safetensors")),
            # map to CPU: load_state_dict moves optimizer state to each parameter's device (GPU index may differ)
            "optimizer": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
            "scheduler": torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True),
            "state": json.loads((folder / STATE_FILE).read_text(encoding="utf-8")),
            "rng": torch.load(folder / "rng.pt", map_location="cpu", weights_only=True)}


def apply_training_state(saved: dict[str, Any], model: Any, optimizer: torch.optim.Optimizer,
                         scheduler: Any) -> TrainState:
    """Put a read checkpoint's adapter, optimizer, scheduler and RNG states back; return its counters."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, saved["adapter"])
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise StageFailed(f"checkpoint {saved['name']} does not fit this model (unexpected {unexpected[:3]}); "
                          "the job's model or LoRA settings changed: delete the checkpoints folder to start over")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    payload = dict(saved["state"])
    restore_rng(payload.pop("rng"), saved["rng"])
    return TrainState(**payload)

