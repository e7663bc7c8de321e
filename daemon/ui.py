"""Rich renderables shared by the one-shot commands (status, jobs, show) and the live view."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"waiting": "yellow", "queued": "cyan", "running": "bold blue", "interrupted": "magenta",
               "succeeded": "green", "failed": "bold red", "cancelled": "dim", "pending": "dim",
               "skipped": "dim", "rejected": "red"}


def state_text(state: str | None) -> Text:
    return Text(state or "-", style=STATE_STYLE.get(state or "", ""))


def progress_text(progress: dict[str, Any] | None) -> str:
    if not progress or progress.get("step") is None:
        return ""
    parts = [f"{progress['step']}/{progress.get('total_steps') or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_s") is not None:
        parts.append(f"eta {int(progress['eta_s'])}s")
    return "  ".join(parts)


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="Jobs", expand=True)
    for col in ("id", "name", "state", "stage", "progress", "updated"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        table.add_row(job["id"], job["name"], state_text(job["state"]), job.get("stage") or "-",
                      progress_text(job.get("progress")), job["updated_at"])
    return table


def job_panel(job: dict[str, Any]) -> Panel:
    stages = Table(expand=True)
    for col in ("stage", "state", "started", "ended", "result"):
        stages.add_column(col, overflow="fold")
    for s in job["stages"]:
        result = s.get("error") or s.get("message") or ", ".join(
            f"{k}={v}" for k, v in list((s.get("summary") or {}).items())[:4])
        stages.add_row(s["name"], state_text(s["state"]), s.get("started_at") or "-", s.get("ended_at") or "-",
                       str(result))
    head = Text.assemble(("state ", "bold"), state_text(job["state"]), f"   datasets {len(job['datasets'])}",
                         f"   base {job.get('base_model')}")
    parts: list[Any] = [head, stages]
    if job.get("progress"):
        parts.append(Text(progress_text(job["progress"])))
    if job.get("error"):
        parts.append(Text(job["error"], style="red"))
    return Panel(Group(*parts), title=f"{job['name']} ({job['id']})")


def status_panel(view: dict[str, Any]) -> Panel:
    d = view["daemon"]
    lines = [Text.assemble(("daemon ", "bold"),
                           (f"running (pid {d['pid']})" if d["alive"] else "not running",
                            "green" if d["alive"] else "yellow")),
             Text(f"home {view['home']}"),
             Text(f"datasets {view['datasets']}   jobs "
                  + (", ".join(f"{k} {v}" for k, v in sorted(view["jobs"].items())) or "none"))]
    if view["inbox_pending"]:
        lines.append(Text(f"inbox: {len(view['inbox_pending'])} file(s) waiting"))
    for r in view["rejected"][:10]:
        lines.append(Text(f"rejected {r['file']}: {r['reason']}", style="red"))
    return Panel(Group(*lines), title="trainbox")
