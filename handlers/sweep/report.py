"""The sweep report: trial table (HTML, JSON, CSV), Optuna's plots, the best parameters; for lr_zoom also a
PNG per zoom stage and ``optimal_lr.json``."""
from __future__ import annotations

import csv
import html
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display in a stage process
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from handlers.context import StageContext  # noqa: E402
from trainbox import lrzoom  # noqa: E402
from trainbox.errors import StageFailed  # noqa: E402
from trainbox.fsio import write_json_atomically, write_text_atomically  # noqa: E402
from trainbox.protocol import StageResult  # noqa: E402
from trainbox.study import open_study, storage_url  # noqa: E402

log = logging.getLogger(__name__)
DPI = 110
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial of the study (trials a concurrent daemon asked beyond ``trials`` left out)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        note = t.user_attrs.get("note", "")
        if t.state.name == "PRUNED" and t.intermediate_values and not note:
            note = f"pruned at step {max(t.intermediate_values)}"
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": STATES.get(t.state.name, t.state.name.lower()), "value": t.value,
                     "params": dict(t.params), "note": note, "seconds": seconds,
                     "job": t.user_attrs.get("sweep_job"), "zoom_stage": t.user_attrs.get("zoom_stage")})
    return rows


def save_plot(draw: Callable[[], Any], path: Path) -> str | None:
    """Draw one of optuna's matplotlib plots into ``path``; the reason when the trials cannot make it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances need 2+ complete trials
            log.info("no %s: %s", path.stem, exc)
            plt.close("all")
            return str(exc) or type(exc).__name__
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(7, 4.2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return None


def zoom_pngs(points: list[dict[str, Any]], out: Path, label: str, sweep_job: str) -> list[Path]:
    """One PNG per zoom stage: the objective against the learning rate (log x), the stage's points highlighted
    over every point the job name has tried."""
    scored = [p for p in points if p["value"] is not None]
    stages = sorted({p["stage"] for p in points if p["sweep_job"] == sweep_job and p["stage"] is not None})
    paths = []
    for stage in stages:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.scatter([p["learning_rate"] for p in scored], [p["value"] for p in scored], color="#c3ccd6",
                   label="every run so far", zorder=1)
        mine = [p for p in scored if p["sweep_job"] == sweep_job and p["stage"] == stage]
        ax.scatter([p["learning_rate"] for p in mine], [p["value"] for p in mine], color="#2b6cb0", s=55,
                   label=f"stage {stage}", zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.set_title(f"lr_zoom stage {stage}")
        ax.legend()
        fig.tight_layout()
        path = out / f"lr_zoom_stage_{stage}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def write_csv(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", "state", "value", *keys, "seconds", "note"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r["value"] is None else r["value"],
                         *[r["params"].get(k, "") for k in keys], "" if r["seconds"] is None else round(r["seconds"], 1),
                         r["note"]])
    write_text_atomically(path, buf.getvalue())


def render_html(title: str, best: dict[str, Any], rows: list[dict[str, Any]], keys: list[str],
                plots: dict[str, str | None], label: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in ["trial", "state", label, *keys, "seconds", "note"])
    body = []
    for r in rows:
        cells = [r["number"], r["state"], "" if r["value"] is None else f"{r['value']:.5g}",
                 *[r["params"].get(k, "") for k in keys], "" if r["seconds"] is None else f"{r['seconds']:.0f}",
                 r["note"]]
        style = ' style="font-weight:bold"' if r["number"] == best["trial"] else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    figures = "".join(f'<h2>{e(name.replace("_", " "))}</h2><img src="{e(name)}.png" alt="{e(name)}">'
                      if reason is None else f"<h2>{e(name.replace('_', ' '))}</h2><p>not drawn: {e(reason)}</p>"
                      for name, reason in plots.items())
    params = "".join(f"<li><code>{e(k)}</code>: {e(str(v))}</li>" for k, v in best["params"].items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>body{{font-family:"
            f"sans-serif;max-width:70em;margin:auto}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}"
            f"</style></head><body><h1>{e(title)}</h1><p>Best trial {best['trial']}: {e(label)} "
            f"{best['value']:.5g}</p><ul>{params}</ul><h2>trials</h2><table><tr>{head}</tr>{''.join(body)}"
            f"</table>{figures}</body></html>")


def write_sweep_report(ctx: StageContext) -> StageResult:
    spec, sw, out = ctx.job, ctx.job.sweep, ctx.stage_dir
    study = open_study(storage_url(sw, ctx.home), sw.study_name(ctx.job_id), sw.direction)
    rows = trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete and sw.method == "lr_zoom":
        complete = from_earlier_runs(ctx)  # every learning rate the zoom aimed at was tried by an earlier run
    if not complete:
        reasons = "; ".join(f"trial {r['number']}: {r['note'] or r['state']}" for r in rows[:5])
        raise StageFailed(f"no trial of the sweep completed ({reasons}); fix what failed and run 'trainbox retry "
                          f"{ctx.job_id}', or drop the job again as a new sweep")
    label = "objective" if sw.objective else sw.metric
    pick = max if sw.direction == "maximize" else min
    top = pick(complete, key=lambda r: r["value"])
    best = {"trial": top["number"], "value": top["value"], "params": top["params"]}
    keys = list(sw.params)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed")}
    vis = optuna.visualization.matplotlib
    plots = {"optimization_history": save_plot(lambda: vis.plot_optimization_history(study), out / "optimization_history.png"),
             "param_importances": save_plot(lambda: vis.plot_param_importances(study), out / "param_importances.png"),
             "slice": save_plot(lambda: vis.plot_slice(study), out / "slice.png")}
    artifacts = {"report": "report.html", "json": "sweep.json", "csv": "trials.csv",
                 **{name: f"{name}.png" for name, reason in plots.items() if reason is None}}
    extra: dict[str, Any] = {}
    if sw.method == "lr_zoom":
        extra = zoom_outputs(ctx, label, artifacts)
    document = {"job": ctx.job_id, "name": spec.name, "study": sw.study_name(ctx.job_id),
                "storage": re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", storage_url(sw, ctx.home)),
                "method": sw.method, "direction": sw.direction, "metric": sw.metric, "objective": sw.objective,
                "best": best, "counts": counts, "trials": rows, **extra}
    write_json_atomically(out / "sweep.json", document)
    write_csv(rows, keys, out / "trials.csv")
    write_text_atomically(out / "report.html", render_html(f"sweep {spec.name}", best, rows, keys, plots, label))
    summary = {"best_trial": best["trial"], "best_value": best["value"], "best_params": best["params"],
               "objective": label, "trials": len(rows), **counts}
    message = (f"best trial {best['trial']} of {len(rows)}: {label} {best['value']:.4f} with "
               + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    return StageResult(summary=summary, artifacts=artifacts, message=message)


def from_earlier_runs(ctx: StageContext) -> list[dict[str, Any]]:
    """The cumulative file's best point as a trial row, for an lr_zoom run that had nothing new to try."""
    best = lrzoom.best_point(lrzoom.load_points(ctx.home, ctx.job.name), ctx.job.sweep.direction)
    if best is None:
        return []
    return [{"number": best["trial"], "state": "complete", "value": best["value"],
             "params": {lrzoom.KEY: best["learning_rate"]}, "note": f"from sweep {best['sweep_job']}",
             "seconds": None, "job": best["sweep_job"], "zoom_stage": best["stage"]}]


def zoom_outputs(ctx: StageContext, label: str, artifacts: dict[str, str]) -> dict[str, Any]:
    """lr_zoom's PNGs and ``optimal_lr.json``, in the stage folder and in ``sweeps/<name>/`` next to the
    cumulative file (the latest run's copies)."""
    sw, name = ctx.job.sweep, ctx.job.name
    points = lrzoom.load_points(ctx.home, name)
    best = lrzoom.best_point(points, sw.direction)
    optimal = {"job": name, "learning_rate": best["learning_rate"], "value": best["value"], "metric": label,
               "direction": sw.direction, "trial": best["trial"], "sweep_job": best["sweep_job"],
               "points_tried": len(points)} if best else None
    shared = lrzoom.folder(ctx.home, name)
    for folder in (ctx.stage_dir, shared):
        folder.mkdir(parents=True, exist_ok=True)
        for png in zoom_pngs(points, folder, label, ctx.job_id):
            if folder == ctx.stage_dir:
                artifacts[png.stem] = png.name
        if optimal:
            write_json_atomically(folder / "optimal_lr.json", optimal)
    artifacts["optimal_lr"] = "optimal_lr.json"
    artifacts["lr_sweep_cumulative"] = str(shared / lrzoom.CUMULATIVE)
    return {"optimal_lr": optimal}
