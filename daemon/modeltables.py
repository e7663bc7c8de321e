"""Rich renderables for ``trainbox models`` and ``trainbox compare``."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from trainbox.numberformat import format_value

# metrics where a smaller number is better (their deltas are coloured the other way round)
LOWER_IS_BETTER = ("ece", "ece_after", "preference_p_value", "eval_loss", "example_mean_loss", "perplexity",
                   "latency_p50_ms", "latency_p95_ms", "p_value", "base_eval_loss", "base_perplexity")
HEADLINE = ("accuracy", "macro_f1", "critical_recall", "ece", "eval_loss", "perplexity")


def _rows(entry: dict[str, Any]) -> str:
    rows = entry.get("rows") or {}
    original, augmented = rows.get("original"), rows.get("augmented")
    if augmented is None:
        return format_value(original, 4)
    return f"{format_value(original, 4)} -> {augmented}"


def _winner(value: Any) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text("yes", style="green") if value else Text("no", style="red")


def models_table(entries: list[dict[str, Any]]) -> Table:
    """One row per model version; metric columns appear when some version has them."""
    table = Table(title="Models")
    table.add_column("model", no_wrap=True)
    table.add_column("base", overflow="fold")
    table.add_column("rows", no_wrap=True, justify="right")
    table.add_column("loss", no_wrap=True, justify="right")
    shown = [(key, head) for key, head in (("accuracy", "acc"), ("macro_f1", "F1"), ("eval_loss", "eval loss"))
             if any((e.get("metrics") or {}).get(key) is not None for e in entries)]
    for _, head in shown:
        table.add_column(head, no_wrap=True, justify="right")
    table.add_column("winner", no_wrap=True)
    table.add_column("created", overflow="fold")
    for e in entries:
        m = e.get("metrics") or {}
        table.add_row(f"{e['name']}:{e['version']}", str(e.get("base_model")), _rows(e),
                      format_value(e.get("train_loss"), 3),
                      *(format_value(m.get(key), 3) for key, _ in shown), _winner(e.get("winner")),
                      str(e.get("created_at") or "-")[:10])
    if not entries:
        table.caption = "no model registered yet: a job's model appears here once its train stage has finished"
    return table


def _delta_text(key: str, delta: float | None, pct: bool = False) -> Text:
    if delta is None:
        return Text("-", style="dim")
    better = delta < 0 if key in LOWER_IS_BETTER else delta > 0
    style = "" if delta == 0 else ("green" if better else "red")
    return Text(f"{delta:+.2f}%" if pct else f"{delta:+.4f}", style=style)


def _reduction_text(reduction: float | None) -> Text:
    if reduction is None:
        return Text("-", style="dim")
    if abs(reduction) < 0.05:
        return Text("no change")
    if reduction > 0:
        return Text(f"{reduction:.1f}% lower", style="green")
    return Text(f"{-reduction:.1f}% higher", style="red")


def comparison_panel(result: dict[str, Any]) -> Panel:
    a, b = result["a"], result["b"]
    label_a, label_b = f"{a['name']}:{a['version']}", f"{b['name']}:{b['version']}"
    table = Table(expand=True)
    for col in ("", label_a, label_b, "change"):
        table.add_column(col, justify="right" if col else "left")
    metrics = result["metrics"]
    for key in [*(k for k in HEADLINE if k in metrics), *(k for k in metrics if k not in HEADLINE)]:
        row = metrics[key]
        table.add_row(key, format_value(row["a"], 4), format_value(row["b"], 4), _delta_text(key, row["delta"]))
    loss = result["train_loss"]
    reduction = loss["reduction_pct"]
    table.add_row("train loss", format_value(loss["a"], 4), format_value(loss["b"], 4),
                  _reduction_text(reduction))
    rows = result["rows"]
    increase = rows["increase"]
    pct = "" if rows["increase_pct"] is None else f" ({rows['increase_pct']:+.1f}%)"
    table.add_row("training rows", format_value(rows["a"], 4), format_value(rows["b"], 4),
                  Text("-", style="dim") if increase is None else Text(f"{increase:+d}{pct}"))
    table.add_row("winner vs base", _winner(result["winner"]["a"]), _winner(result["winner"]["b"]), "")
    head = Text.assemble(("A ", "bold"), f"{label_a} (base {a.get('base_model')}, job {a.get('job_id')})\n",
                         ("B ", "bold"), f"{label_b} (base {b.get('base_model')}, job {b.get('job_id')})")
    return Panel(Group(head, table), title=f"compare {label_a} -> {label_b}")
