"""Job records: creation, state names, and the versioned JSON view scripts rely on."""
from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from daemon.store import utcnow
from trainbox.jobspec import JobSpec

ACTIVE_STATES = ("waiting", "queued", "running", "interrupted")
JSON_SCHEMA_VERSION = 1


def new_job_id(name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{name[:40]}-{secrets.token_hex(2)}"


def new_job(spec: JobSpec, *, source: str, claim: str | None) -> dict[str, Any]:
    """A fresh job record in state ``waiting`` (the daemon resolves its datasets right after)."""
    now = utcnow()
    return {
        "id": new_job_id(spec.name),
        "name": spec.name,
        "state": "waiting",
        "stage": None,
        "stages": [_new_stage(s) for s in spec.stages],
        "progress": None,
        "error": None,
        "created_at": now,
        "updated_at": now,
        "spec": spec.model_dump(mode="json"),
        "datasets": [],
        "source": source,
        "claim": claim,
        "attempts": 0,
        "pid": None,
        "device": None,
        "model": None,
    }


def _new_stage(name: str) -> dict[str, Any]:
    return {"name": name, "state": "pending", "started_at": None, "ended_at": None,
            "summary": {}, "artifacts": {}, "message": "", "error": None, "exit_code": None}


def reset_stages_from(doc: dict[str, Any], index: int) -> None:
    """Make stage ``index`` and every later stage pending again (retry)."""
    for stage in doc["stages"][index:]:
        stage.update(_new_stage(stage["name"]))


def job_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The documented ``--json`` shape of one job (schema version ``JSON_SCHEMA_VERSION``)."""
    return {
        "id": doc["id"],
        "name": doc["name"],
        "state": doc["state"],
        "stage": doc.get("stage"),
        "stages": [
            {k: s.get(k) for k in ("name", "state", "started_at", "ended_at", "summary", "artifacts",
                                   "message", "error")}
            for s in doc["stages"]
        ],
        "progress": doc.get("progress"),
        "error": doc.get("error"),
        "created_at": doc["created_at"],
        "updated_at": doc["updated_at"],
        "datasets": doc.get("datasets", []),
        "dataset_patterns": doc["spec"].get("datasets", []),
        "base_model": doc["spec"].get("base_model"),
        "source": doc.get("source"),
        "attempts": doc.get("attempts", 0),
        "device": doc.get("device"),
        "model": doc.get("model"),
    }


def job_outcome(doc: dict[str, Any]) -> str:
    """One line saying what a finished job achieved, for the log and the notification."""
    parts = []
    for stage in doc["stages"]:
        s = stage.get("summary") or {}
        if stage["name"] == "train" and s.get("final_loss") is not None:
            parts.append(f"train loss {s['final_loss']:.4f} after {s.get('total_steps')} steps")
        elif stage["name"] == "evaluate" and s.get("accuracy") is not None:
            line = f"held-out accuracy {s['accuracy']:.3f}, macro-F1 {s.get('macro_f1', 0):.3f}"
            if s.get("base_accuracy") is not None:
                line += f" (base model {s['base_accuracy']:.3f}, McNemar p={s.get('p_value', float('nan')):.3g})"
            parts.append(line)
        elif stage["name"] == "evaluate" and s.get("perplexity") is not None:
            parts.append(f"perplexity {s['perplexity']:.2f}")
        elif stage["name"] == "export" and stage["state"] == "skipped":
            parts.append(f"export skipped: {stage.get('message')}")
        elif stage["name"] == "export" and stage.get("artifacts", {}).get("model_dir"):
            parts.append(f"model in {stage['artifacts']['model_dir']}")
    return "; ".join(parts)
