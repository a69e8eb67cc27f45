"""The summary of a pipeline run: a terminal table, report.md, report.json and report.png."""

from __future__ import annotations

import csv
import os
from typing import Any, Callable, Sequence

from framework import artifacts

COLUMNS = [  # (key, header, format)
    ("stage", "stage", "{}"),
    ("kind", "kind", "{}"),
    ("params_total", "params", "{:,}"),
    ("params_nonzero", "non-zero", "{:,}"),
    ("size_mb", "size MB", "{:.2f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("val_accuracy", "val acc", "{:.3f}"),
    ("val_macro_f1", "macro-F1", "{:.3f}"),
    ("latency_ms_per_example", "ms/example", "{:.2f}"),
    ("latency_ms_per_token", "ms/token", "{:.2f}"),
    ("tokens_per_s", "fwd tok/s", "{:,.0f}"),
    ("train_tokens_per_s", "train tok/s", "{:,.0f}"),
    ("wall_time_s", "stage s", "{:.1f}"),
    ("status", "status", "{}"),
]


def row(stage: str, kind: str, stage_dir: str, metrics: dict, cached: bool, seconds: float) -> dict:
    """One report row. A cached stage reports the numbers measured when it ran."""
    return {
        "stage": stage,
        "kind": kind,
        "stage_dir": stage_dir,
        "params_total": metrics.get("params_total"),
        "params_nonzero": metrics.get("params_nonzero"),
        "size_mb": metrics.get("size_bytes", 0) / 1e6,
        "val_ppl": metrics.get("val_ppl"),
        "val_ppl_start": metrics.get("val_ppl_start"),
        "baseline_val_ppl": metrics.get("baseline_val_ppl"),
        "val_accuracy": metrics.get("val_accuracy"),
        "val_macro_f1": metrics.get("val_macro_f1"),
        "baseline_val_accuracy": metrics.get("baseline_val_accuracy"),
        "latency_ms_per_example": metrics.get("latency_ms_per_example"),
        "latency_ms_per_token": metrics.get("latency_ms_per_token"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "train_tokens_per_s": metrics.get("train_tokens_per_s"),
        "wall_time_s": metrics.get("wall_time_s"),
        "status": f"cached ({seconds:.1f}s)" if cached else "ran",
        "cached": cached,
    }


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The columns some row has a value for: a language model's pipeline shows perplexity, a classifier's accuracy."""
    return [c for c in COLUMNS if c[0] in ("stage", "kind", "status") or any(r.get(c[0]) is not None for r in rows)]


def baseline_notes(rows: list[dict]) -> list[str]:
    """What each distilled student reached without its teacher."""
    notes = []
    for r in rows:
        if r.get("baseline_val_ppl"):
            notes.append(f"{r['stage']}: the same student without a teacher reaches val ppl {r['baseline_val_ppl']:.2f}")
        if r.get("baseline_val_accuracy") is not None:
            notes.append(f"{r['stage']}: the same student without a teacher reaches val accuracy {r['baseline_val_accuracy']:.3f}")
    return notes


def markdown(rows: list[dict]) -> str:
    columns = _columns(rows)
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    notes = [f"- {note}" for note in baseline_notes(rows)]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def markdown_table(rows: Sequence[dict], columns: dict[str, str] | None = None, format_cell: Callable[[Any], str] | None = None) -> str:
    """A Markdown table of dicts: `columns` maps row keys to headers in display order (default: every key of
    the first row); numbers are right-aligned."""
    if not rows:
        return "(no rows)\n"
    columns = columns or {key: key for key in rows[0]}
    format_cell = format_cell or _format_cell
    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
        *("| " + " | ".join(format_cell(row.get(key)) for key in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def print_table(rows: list[dict], title: str = "pipeline") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = _columns(rows)
    for _, header, _ in columns:
        table.add_column(header, justify="right" if header not in ("stage", "kind", "status") else "left")
    for r in rows:
        table.add_row(*(_cell(r.get(k), f) for k, _, f in columns))
    console = Console()
    if not console.is_terminal:  # logs and CI: don't squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    for note in baseline_notes(rows):
        console.print(note)


def write(run_dir: str, rows: list[dict]) -> None:
    artifacts.atomic_write_json(os.path.join(run_dir, "report.json"), rows)
    artifacts.atomic_write_text(os.path.join(run_dir, "report.md"), markdown(rows))
    plot(run_dir, rows)
    print_table(rows, title=os.path.basename(os.path.normpath(run_dir)))


def loss_curve(stage_dir: str) -> tuple[list[int], list[float]]:
    """Train loss per step. A resumed stage logs again the steps after its last checkpoint: the rerun wins."""
    path = os.path.join(stage_dir, "logs", "metrics.csv")
    loss_at: dict[int, float] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for record in csv.DictReader(f):
                if record.get("train/loss"):
                    loss_at[int(record["step"])] = float(record["train/loss"])
    steps = sorted(loss_at)
    return steps, [loss_at[step] for step in steps]


def plot(run_dir: str, rows: list[dict]) -> None:
    """Perplexity (a classifier: accuracy) against size on disk per stage, and the loss curves of the training stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    measure, label = ("val_accuracy", "val accuracy") if any(r.get("val_accuracy") is not None for r in rows) else ("val_ppl", "val perplexity")
    for r in rows:
        if r.get(measure) is not None:
            left.scatter(r["size_mb"], r[measure])
            left.annotate(r["stage"], (r["size_mb"], r[measure]), textcoords="offset points", xytext=(5, 5))
    left.set(xlabel="size on disk (MB)", ylabel=label, title=f"{label} against size")
    for r in rows:
        steps, losses = loss_curve(r["stage_dir"])
        if steps:
            right.plot(steps, losses, label=r["stage"])
    right.set(xlabel="step", ylabel="train loss", title="training loss")
    if right.lines:
        right.legend()
    fig.tight_layout()
    tmp = os.path.join(run_dir, ".report.png.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(run_dir, "report.png"))


def stage_dirs(run_dir: str) -> list[str]:
    """The finished stages of a pipeline run directory, in the order they finished."""
    candidates = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
    done = [d for d in candidates if artifacts.is_complete(d)]
    return sorted(done, key=lambda d: os.path.getmtime(os.path.join(d, artifacts.COMPLETE)))


def rebuild(run_dir: str) -> list[dict]:
    """The report of a pipeline run directory, from its stages' artifacts (the evaluate recipe)."""
    rows = []
    for stage_dir in stage_dirs(run_dir):
        metrics = artifacts.read_metrics(stage_dir)
        rows.append(row(os.path.basename(stage_dir), metrics.get("kind", "?"), stage_dir, metrics, cached=True, seconds=0.0))
    write(run_dir, rows)
    return rows
