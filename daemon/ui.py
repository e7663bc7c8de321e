"""Rich renderables shared by the one-shot commands (status, jobs, show, models) and the live view (top)."""
from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"waiting": "yellow", "queued": "cyan", "running": "bold blue", "interrupted": "magenta",
               "succeeded": "green", "failed": "bold red", "cancelled": "dim", "pending": "dim",
               "skipped": "dim", "rejected": "red"}
STATE_ORDER = ("running", "queued", "waiting", "interrupted", "failed", "succeeded", "cancelled")
SPARK = "▁▂▃▄▅▆▇█"


# small formatters -------------------------------------------------------------
def state_text(state: str | None) -> Text:
    return Text(state or "-", style=STATE_STYLE.get(state or "", ""))


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h01m``, ``3d04h``."""
    if seconds is None:
        return "?"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age_of(iso: str | None, now: float | None = None) -> float | None:
    """Seconds since an ISO timestamp written by the store."""
    if not iso:
        return None
    try:
        return (now or time.time()) - datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def clock(value: Any) -> str:
    """HH:MM:SS of an ISO string or an epoch number (event times come in both)."""
    try:
        ts = datetime.fromisoformat(value).timestamp() if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(ts))


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def numeric_items(summary: dict[str, Any] | None, limit: int = 6) -> list[tuple[str, float]]:
    """Numbers of a stage summary, one level of nesting flattened (``loss.final``), at most ``limit``."""
    out: list[tuple[str, float]] = []
    for key, value in (summary or {}).items():
        if isinstance(value, dict):
            out += [(f"{key}.{k}", v) for k, v in value.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((key, value))
    return out[:limit]


def sparkline(values: Iterable[float], width: int) -> str:
    """The whole series squeezed into ``width`` block characters (bucket means), low to high."""
    data = [v for v in values if v is not None and v == v]
    if not data or width <= 0:
        return ""
    if len(data) > width:
        size = len(data) / width
        data = [sum(chunk) / len(chunk) for chunk in
                (data[int(i * size): max(int((i + 1) * size), int(i * size) + 1)] for i in range(width))]
    lo, hi = min(data), max(data)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(int((v - lo) / span * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in data)


def progress_text(progress: dict[str, Any] | None) -> str:
    if not progress or progress.get("step") is None:
        return ""
    parts = [f"{progress['step']}/{progress.get('total_steps') or '?'}" + (f" {progress['unit']}"
                                                                         if progress.get("unit") else "")]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_s") is not None:
        parts.append(f"eta {duration(progress['eta_s'])}")
    return "  ".join(parts)


def trial_text(trial: dict[str, Any] | None) -> str:
    """A sweep trial's parameters and how it ended: ``lr=0.0132 r=4: pruned at step 4``."""
    if not trial:
        return ""
    params = " ".join(f"{k.rsplit('.', 1)[-1]}={number(v) if isinstance(v, float) else v}"
                      for k, v in trial["params"].items())
    if trial["state"] == "running":
        return f"trial {trial['number']}: {params}"
    value = f", value {number(trial['value'])}" if trial.get("value") is not None else ""
    note = trial.get("note") or ""
    outcome = note if note.startswith(trial["state"]) else f"{trial['state']}{value}" + (f": {note}" if note else "")
    return f"trial {trial['number']}: {params}; {outcome}"


def nest_trials(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jobs in their order, each sweep followed by its trials (by trial number)."""
    children: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        if job.get("parent"):
            children.setdefault(job["parent"], []).append(job)
    known = {j["id"] for j in jobs}
    out = []
    for job in jobs:
        if job.get("parent") in known:
            continue
        out.append(job)
        out += sorted(children.get(job["id"], []), key=lambda j: j["trial"]["number"])
    return out


def _line(*parts: Any) -> Text:
    """One terminal line: never wraps, an ellipsis marks what did not fit."""
    text = Text.assemble(*parts)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


# one-shot commands --------------------------------------------------------------
def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="Jobs", expand=True)
    for col in ("id", "name", "state", "stage", "progress"):
        table.add_column(col, overflow="fold")
    table.add_column("updated", no_wrap=True)
    for job in nest_trials(jobs):
        name = f"└ {job['name']}" if job.get("parent") else job["name"]
        detail = trial_text(job.get("trial")) if job.get("trial") and job["state"] != "running" \
            else progress_text(job.get("progress"))
        table.add_row(job["id"], name, state_text(job["state"]), job.get("stage") or "-", detail,
                      f"{duration(age_of(job['updated_at']))} ago")
    return table


def short_time(iso: str | None) -> str:
    """Local ``HH:MM:SS`` for today, ``YYYY-MM-DD HH:MM`` before."""
    if not iso:
        return "-"
    try:
        moment = datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso
    today = datetime.now().astimezone().date()
    return moment.strftime("%H:%M:%S" if moment.date() == today else "%Y-%m-%d %H:%M")


def job_panel(job: dict[str, Any], trials: list[dict[str, Any]] | None = None) -> Panel:
    stages = Table(expand=True)
    for col in ("stage", "state", "started", "took", "result"):
        stages.add_column(col, overflow="fold")
    for s in job["stages"]:
        result = s.get("error") or s.get("message") or ", ".join(
            f"{k}={number(v)}" for k, v in numeric_items(s.get("summary"), 4))
        took = "-"
        if s.get("started_at"):
            took = duration((age_of(s["started_at"]) or 0) - (age_of(s.get("ended_at")) or 0))
        stages.add_row(s["name"], state_text(s["state"]), short_time(s.get("started_at")), took, str(result))
    head = Text.assemble(("state ", "bold"), state_text(job["state"]), f"   datasets {len(job['datasets'])}",
                         f"   base {job.get('base_model')}", f"   device {job.get('device') or '-'}")
    parts: list[Any] = [head, stages]
    if job.get("trial"):
        parts.append(Text(f"{trial_text(job['trial'])}   (sweep {job['parent']})"))
    if job.get("sweep"):
        parts.append(Text(f"the best trial's model of sweep {job['sweep']}"))
    if trials:
        table = Table(title="trials", expand=True)
        for col in ("id", "state", "trial"):
            table.add_column(col, overflow="fold")
        for t in trials:  # by trial number (Store.trials_of)
            table.add_row(t["id"], state_text(t["state"]), trial_text(t["trial"]))
        parts.append(table)
    if job["state"] == "waiting":
        parts.append(Text("waiting for a dataset matching: " + ", ".join(job.get("dataset_patterns") or []),
                          style="yellow"))
    if job.get("progress"):
        parts.append(progress_line(job["progress"], 60))
        parts += rank_lines(job["progress"].get("ranks"))
    if job.get("error"):
        parts.append(Text(job["error"], style="red"))
    return Panel(Group(*parts), title=f"{job['name']} ({job['id']})")


def status_panel(view: dict[str, Any]) -> Panel:
    """``trainbox status``: daemon health, job counts, inbox, rejected files, recent events."""
    parts: list[RenderableType] = [daemon_line(view), home_line(view, 200), counts_line(view)]
    if view["inbox_pending"]:
        parts.append(Text(f"inbox: {len(view['inbox_pending'])} file(s) waiting: "
                          + ", ".join(view["inbox_pending"][:5])))
    if view["rejected"]:
        parts += [Text(f"rejected files ({len(view['rejected'])})", style="bold"), rejected_table(view["rejected"], 10)]
    if view.get("events"):
        parts += [Text("recent events", style="bold"), events_table(view["events"], 10)]
    return Panel(Group(*parts), title="trainbox")


# pieces of the status and live views ------------------------------------------------
def daemon_line(view: dict[str, Any]) -> Text:
    d = view["daemon"]
    if not d["alive"]:
        return _line(("daemon ", "bold"), ("not running", "yellow"), "  start it with: trainbox run")
    parts: list[Any] = [("daemon ", "bold"), (f"running pid {d['pid']}", "green")]
    up = age_of(d.get("started_at"))
    if up is not None:
        parts.append(f"  up {duration(up)}")
    if d.get("heartbeat_age_s") is not None:
        stale = d["heartbeat_age_s"] > 30
        parts.append((f"  beat {duration(d['heartbeat_age_s'])} ago", "red" if stale else "dim"))
    return _line(*parts)


def home_line(view: dict[str, Any], width: int) -> Text:
    """``home PATH  watching inbox/``; a long path keeps its end (the part that tells homes apart)."""
    watching = "  watching inbox/" if view["daemon"].get("watching") else ""
    room = max(width - len("home ") - len(watching), 8)
    home = view["home"] if len(view["home"]) <= room else "…" + view["home"][-(room - 1):]
    return _line(("home ", "bold"), home, watching)


def counts_line(view: dict[str, Any]) -> Text:
    counts = view["jobs"]
    parts: list[Any] = [("jobs ", "bold")]
    for state in STATE_ORDER:
        if counts.get(state):
            parts += [(f"{state} {counts[state]}", STATE_STYLE[state]), "  "]
    if len(parts) == 1:
        parts.append("none  ")
    parts.append(f"datasets {view['datasets']}")
    return _line(*parts)


def queue_line(jobs: list[dict[str, Any]]) -> Text:
    """Jobs waiting their turn, oldest first."""
    waiting = [j for j in jobs if j["state"] in ("queued", "waiting", "interrupted")]
    if not waiting:
        return _line(("queue ", "bold"), ("empty", "dim"))
    parts: list[Any] = [("queue ", "bold")]
    for j in waiting:
        parts += [f"{j['name']} ", (f"({j['state']})", STATE_STYLE[j["state"]]), "  "]
    return _line(*parts)


def progress_line(progress: dict[str, Any], width: int) -> Table:
    """Bar plus step / total, percent, ETA and tokens/s on one line."""
    step, total = progress.get("step") or 0, progress.get("total_steps")
    facts = [f"{step}/{total or '?'}"]
    if total:
        facts.append(f"{100 * step / total:.0f}%")
    if progress.get("eta_s") is not None:
        facts.append(f"eta {duration(progress['eta_s'])}")
    if progress.get("tokens_per_s") is not None:
        facts.append(f"{progress['tokens_per_s']:.0f} tok/s")
    label = "  ".join(facts)
    grid = Table.grid(padding=(0, 1))
    bar_width = max(width - len(label) - 1, 0)
    if bar_width >= 8:
        grid.add_column(width=bar_width)
        grid.add_column(no_wrap=True)
        grid.add_row(ProgressBar(total=total or 1, completed=step if total else 0, width=bar_width), label)
    else:
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(label)
    return grid


def running_job(job: dict[str, Any], live: dict[str, Any], width: int) -> Group:
    """One running job: name and stage, progress bar, loss sparkline, eval numbers (4 lines at most)."""
    stage_names = [s["name"] for s in job["stages"]]
    stage = job.get("stage") or "-"
    pos = f" {stage_names.index(stage) + 1}/{len(stage_names)}" if stage in stage_names else ""
    trial = f"  {trial_text(job['trial'])}" if job.get("trial") else ""  # a sweep's trial: its parameters
    lines: list[RenderableType] = [_line((job["name"], "bold"), f"  {stage}{pos}", trial,
                                         (f"  {job.get('device') or ''}", "dim"), (f"  {job['id']}", "dim"))]
    progress = live.get("progress") or job.get("progress")
    if progress and progress.get("step") is not None:
        lines.append(progress_line(progress, width))
        lines += rank_lines(progress.get("ranks"))
    losses = live.get("losses") or []
    if losses:
        label = f" {losses[-1]:.4f} (min {min(losses):.4f})" + loss_terms_text(progress or {})
        lines.append(_line(("loss ", "bold"), (sparkline(losses, max(width - 5 - len(label), 4)), "cyan"), label))
    evals = live.get("eval") or []
    if evals:
        lines.append(_line(("eval ", "bold"), "  ".join(f"{k} {number(v)}" for k, v in evals)))
    return Group(*lines)


LOSS_TERM_SHORT = (("loss_generation", "gen"), ("loss_style", "style"), ("loss_relationship", "rel"),
                   ("loss_contrastive", "con"))


def loss_terms_text(progress: dict[str, Any]) -> str:
    """The latest step's loss terms (``  gen 1.23 style 1.40 con 0.61``); empty when generation is the only one."""
    terms = [(short, progress[key]) for key, short in LOSS_TERM_SHORT if progress.get(key) is not None]
    if [short for short, _ in terms] in ([], ["gen"]):
        return ""
    return "  " + " ".join(f"{short} {value:.3f}" for short, value in terms)


def rank_lines(ranks: list[dict[str, Any]] | None) -> list[Text]:
    """One line per rank of a distributed train stage: where it runs, its step, GPU utilisation where known."""
    out = []
    for r in ranks or []:
        if r.get("gpu_utilization_percent") is not None:
            load = f"gpu util {r['gpu_utilization_percent']}%  mem {(r.get('gpu_memory_used_mib') or 0) / 1024:.1f} GiB"
        else:
            load = f"cpu {r.get('process_cpu_percent') or 0:.0f}%"
        out.append(_line((f" rank {r.get('rank')} ", "bold"), f"node {r.get('node_rank', 0)}  {r.get('device')}  "
                         f"step {r.get('step')}  {load}  rss {r.get('process_rss_mib')} MiB", (f"  pid {r.get('pid')}",
                                                                                             "dim")))
    return out


def gpu_lines(gpus: list[dict[str, Any]]) -> list[Text]:
    if not gpus:
        return [_line(("gpu ", "bold"), ("no GPU", "dim"))]
    out = []
    for g in gpus:
        hot = (g.get("temperature_c") or 0) >= 80
        out.append(_line((f"gpu{g['index']} ", "bold"), f"{g['name']}  util {g['utilization_percent']}%  "
                         f"mem {g['memory_used_mib'] / 1024:.1f}/{g['memory_total_mib'] / 1024:.1f} GiB  ",
                         (f"{g['temperature_c']}C", "red" if hot else "")))
    return out


def events_table(events: list[dict[str, Any]], limit: int) -> Table:
    """Newest events last (like a log), at most ``limit`` rows."""
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(no_wrap=True, style="dim")
    table.add_column(no_wrap=True, style="bold")
    table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    for e in events[-limit:] if limit > 0 else []:
        style = "red" if any(w in e.get("kind", "") for w in ("fail", "reject", "warning")) else ""
        table.add_row(clock(e.get("time")), e.get("kind", "?"), Text(str(e.get("message", "")), style=style))
    return table


def rejected_table(rejected: list[dict[str, Any]], limit: int) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(no_wrap=True, style="red")
    table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    for r in rejected[:limit] if limit > 0 else []:
        reason = r["reason"][len(r["file"]) + 2:] if r["reason"].startswith(f"{r['file']}: ") else r["reason"]
        table.add_row(r["file"], reason)
    return table
