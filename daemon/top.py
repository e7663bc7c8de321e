"""``trainbox top``: a live view of the daemon, its jobs and the GPUs. Reads files only, never writes."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from daemon.config import resolve_home
from daemon.gpus import gpu_readings
from daemon.jobs import job_view
from daemon.layout import Layout
from daemon.status import status_view
from daemon.store import Store
from daemon.ui import (counts_line, daemon_line, events_table, gpu_lines, home_line, number, numeric_items, queue_line,
                       rejected_table, running_job)
from trainbox.protocol import PROGRESS_FILE

log = logging.getLogger(__name__)
METRICS_FILE = Path("train") / "metrics" / "training_metrics.jsonl"
JOB_LINES = 4  # name, bar, loss, eval (plus one line per rank of a distributed run)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("top", parents=[common], help="live view of the daemon, jobs, GPUs and events")
    p.add_argument("--once", action="store_true", help="print one frame and exit (automatic when not a terminal)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.set_defaults(func=cmd_top)


class MetricsTail:
    """Follows a training metrics JSONL: reads only new complete lines; starts over when it is rewritten."""

    def __init__(self, path: Path):
        self.path = path
        self._reset(None)

    def _reset(self, identity: tuple[int, int] | None) -> None:
        self.identity, self.offset = identity, 0
        self.losses: list[float] = []
        self.last_eval: dict[str, float] = {}

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._reset(None)
            return
        if (st.st_ino, st.st_dev) != self.identity or st.st_size < self.offset:
            self._reset((st.st_ino, st.st_dev))  # replaced on resume: read it again from the start
        if st.st_size == self.offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        for raw in chunk[:complete].splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row.get("loss"), (int, float)):
                self.losses.append(float(row["loss"]))
            if row.get("eval_loss") is not None:
                self.last_eval = {k: row[k] for k in ("eval_loss", "perplexity") if row.get(k) is not None}
        self.offset += complete


class TopSource:
    """Everything one frame shows, read from the store (read-only) and the stage directories."""

    def __init__(self, home: Path):
        self.home = home
        self.layout = Layout(home)
        self.tails: dict[str, MetricsTail] = {}

    def snapshot(self) -> dict[str, Any]:
        store = Store.for_home(self.home, readonly=True)
        view = status_view(self.home, store)
        jobs = [job_view(j) for j in store.all_jobs()]
        running = [j for j in jobs if j["state"] == "running"]
        self.tails = {j["id"]: self.tails.get(j["id"]) or MetricsTail(self.layout.job_dir(j["id"]) / METRICS_FILE)
                      for j in running}
        return {"view": view, "jobs": jobs, "live": {j["id"]: self._live(j) for j in running},
                "gpus": gpu_readings(), "last_eval": latest_eval(jobs), "time": time.time()}

    def _live(self, job: dict[str, Any]) -> dict[str, Any]:
        progress = None
        if job.get("stage"):
            path = self.layout.stage_dir(job["id"], job["stage"]) / PROGRESS_FILE
            try:
                progress = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                progress = None  # not written yet, or between stages: the store's copy is used
        tail = self.tails[job["id"]]
        tail.poll()
        evals = list(tail.last_eval.items())
        for stage in job["stages"]:
            if stage["name"] == "evaluate" and stage["state"] == "succeeded":
                evals += numeric_items(stage.get("summary"), 4)
        return {"progress": progress, "losses": tail.losses, "eval": evals}


def latest_eval(jobs: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float]]] | None:
    """Name and numbers of the most recently finished evaluate stage."""
    done = [(s.get("ended_at") or "", j["name"], s) for j in jobs for s in j["stages"]
            if s["name"] == "evaluate" and s["state"] == "succeeded" and numeric_items(s.get("summary"))]
    if not done:
        return None
    _, name, stage = max(done, key=lambda d: d[0])
    return name, numeric_items(stage.get("summary"))


def render(snap: dict[str, Any], width: int, height: int | None) -> RenderableType:
    """One frame. With a ``height``, sections shrink (events first, then rejected files) to fit it."""
    view, jobs = snap["view"], snap["jobs"]
    title = Text.assemble((" trainbox top ", "reverse bold"), "  ",
                          (time.strftime("%H:%M:%S", time.localtime(snap["time"])), "dim"), ("  Ctrl-C quits", "dim"))
    title.no_wrap, title.overflow = True, "ellipsis"
    parts: list[RenderableType] = [title, daemon_line(view), home_line(view, width), counts_line(view)]
    running = [j for j in jobs if j["state"] == "running"]
    budget = (height - 1) if height else None  # the last row stays free so the terminal never scrolls
    fixed = 1 + (1 if snap["last_eval"] else 0) + max(len(snap["gpus"]), 1)  # queue, last eval, gpus
    groups = [running_job(job, snap["live"].get(job["id"], {}), width) for job in running]
    fit_jobs = len(running)
    if budget is not None:
        room_for_jobs = budget - len(parts) - fixed
        fit_jobs = _fitting(groups, room_for_jobs)
        if fit_jobs < len(running):
            fit_jobs = _fitting(groups, room_for_jobs - 1)  # one line says how many more
    parts += groups[:fit_jobs]
    if len(running) > fit_jobs:
        parts.append(heading(f"... {len(running) - fit_jobs} more running: trainbox jobs", "dim"))
    parts.append(queue_line(jobs))
    if snap["last_eval"]:
        name, items = snap["last_eval"]
        line = Text.assemble(("last eval ", "bold"), f"{name}: ", "  ".join(f"{k} {number(v)}" for k, v in items))
        line.no_wrap, line.overflow = True, "ellipsis"
        parts.append(line)
    parts += gpu_lines(snap["gpus"])
    events, rejected = view["events"], view["rejected"]
    if budget is None:
        n_events, n_rejected = 10, 10
    else:
        room = budget - sum(_lines(p) if isinstance(p, Group) else 1 for p in parts)
        n_rejected = min(len(rejected), max(room - 2, 0) // 2 if events else max(room - 1, 0))
        n_events = min(len(events), max(room - (n_rejected + 1 if n_rejected else 0) - 1, 0))
    if n_events:
        parts += [heading("events"), events_table(events, n_events)]
    if n_rejected:
        parts += [heading(f"rejected files ({len(rejected)}, reasons in rejected/*.error.txt)"),
                  rejected_table(rejected, n_rejected)]
    return Group(*parts)


def _lines(group: Group) -> int:
    return max(JOB_LINES, len(group.renderables))


def _fitting(groups: list[Group], room: int) -> int:
    """How many of ``groups`` (in order) fit in ``room`` lines."""
    used = 0
    for n, group in enumerate(groups):
        used += _lines(group)
        if used > room:
            return n
    return len(groups)


def heading(text: str, style: str = "bold") -> Text:
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _frame(source: TopSource, console: Console, fixed_height: bool) -> RenderableType:
    try:
        return render(source.snapshot(), console.width, console.height if fixed_height else None)
    except (OSError, ValueError) as exc:  # e.g. a home that is not one yet: show why, keep trying
        return Text(f"cannot read {source.home}: {exc}", style="red")


def cmd_top(args: argparse.Namespace) -> int:
    from daemon.cli import console

    source = TopSource(resolve_home(args.home))
    if args.once or not console.is_terminal:
        console.print(_frame(source, console, fixed_height=False))
        return 0
    try:
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(_frame(source, console, fixed_height=True), refresh=True)
                time.sleep(max(args.interval, 0.1))
    except KeyboardInterrupt:
        return 0
