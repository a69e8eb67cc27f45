"""The summary of a pipeline run: a terminal table, report.md, report.json and report.png.

Every stage is measured in the runtime its format targets (torch eager, onnxruntime, a GGUF read back
through transformers), on the evaluation set a pipeline names (pipeline.evaluate_on), so perplexities compare across stages."""

from __future__ import annotations

import csv
import os
from typing import Any, Callable, Sequence

from framework import artifacts
from framework.evaluation import REPEATS

COLUMNS = [  # (key, header, format)
    ("stage", "stage", "{}"),
    ("kind", "kind", "{}"),
    ("runtime", "runtime", "{}"),
    ("params_total", "params", "{:,}"),
    ("params_nonzero", "non-zero", "{:,}"),
    ("size_mb", "size MB", "{:.2f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_tokens_per_s_b1", "decode tok/s b1", "{:,.0f}"),
    ("decode_tokens_per_s_b8", "decode tok/s b8", "{:,.0f}"),
    ("val_accuracy", "val acc", "{:.3f}"),
    ("val_macro_f1", "macro-F1", "{:.3f}"),
    ("latency_ms_per_example", "ms/example", "{:.2f}"),
    ("train_tokens_per_s", "train tok/s", "{:,.0f}"),
    ("wall_time_s", "stage s", "{:.1f}"),
    ("status", "status", "{}"),
]
TEXT_COLUMNS = ("stage", "kind", "runtime", "status")

# What each compression saves, and where it runs faster (README: "What buys speed where").
SPEED_NOTES = """\
What buys speed where: unstructured and N:M (2:4) pruning store zeros in dense tensors: no smaller on disk
and no faster in any runtime here (no mainstream runtime serves such sparsity faster; vLLM dropped 2:4).
Structured pruning and distillation make a smaller dense model: smaller and faster everywhere. Layer sharing
keeps one copy of each group's weights in memory but the same compute per token: no faster. Low-rank
factors cut the factorized layers' weights and FLOPs in torch and ONNX (GGUF multiplies them back). int8
with onnxruntime (the quantize stage's CPU default) stores ~0.27x of fp32 and decodes faster than fp32
torch; torchao's int8 is as small but slower than fp32 on a CPU (fast on GPUs). A GGUF export is measured
as transformers reads it back (dequantized to fp32): its size and perplexity are the file's, its speed is
llama.cpp's to measure."""


def row(stage: str, kind: str, stage_dir: str, metrics: dict, cached: bool, seconds: float) -> dict:
    """One report row. A cached stage reports the numbers measured when it ran."""
    keys = (
        "runtime", "params_total", "params_nonzero", "val_ppl", "val_ppl_start", "baseline_val_ppl", "prefill_ms", "prefill_tokens",
        "decode_tokens_per_s_b1", "decode_tokens_per_s_b8", "train_tokens_per_s", "wall_time_s", "sample", "eval_blocks", "eval_block_tokens",
        "eval_data", "val_accuracy", "val_macro_f1", "baseline_val_accuracy", "latency_ms_per_example",
    )
    return {
        "stage": stage,
        "kind": kind,
        "stage_dir": stage_dir,
        **{key: metrics.get(key) for key in keys},
        "size_mb": metrics.get("size_bytes", 0) / 1e6,
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
    if any(r.get("eval_blocks") for r in rows):
        lines += ["", measured_how(rows)]
    lines += [f"- {note}" for note in baseline_notes(rows)]
    samples = [f"- {r['stage']}: {r['sample']!r}" for r in rows if r.get("sample")]
    if samples:
        lines += ["", "Greedy samples:", *samples]
    return "\n".join([*lines, "", SPEED_NOTES]) + "\n"


def measured_how(rows: list[dict]) -> str:
    """How the table's numbers were measured, from what the rows recorded."""
    first = next((r for r in rows if r.get("eval_blocks")), {})
    prompt = next((r["prefill_tokens"] for r in rows if r.get("prefill_tokens")), None)
    sets = {r.get("eval_data") for r in rows if r.get("eval_blocks")}
    where = (f"on the same held-out set ({sets.pop()}: {first.get('eval_blocks', '?')} blocks of {first.get('eval_block_tokens', '?')} tokens)"
             if len(sets) == 1 else "each on the val split of its own data (pipeline.evaluate_on=<stage> puts them on one)")
    return (
        f"Every stage in the runtime its format targets, {where}. Prefill: a {prompt}-token prompt at batch 1; decode: "
        f"tokens/s of all sequences together at batch 1 and 8; each the median of {REPEATS} repeats after a warm-up."
    )


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
    for key, header, _ in columns:
        table.add_column(header, justify="left" if key in TEXT_COLUMNS else "right")
    for r in rows:
        table.add_row(*(_cell(r.get(k), f) for k, _, f in columns))
    console = Console()
    if not console.is_terminal:  # logs and CI: don't squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    for note in baseline_notes(rows):
        console.print(note)
    for r in rows:
        if r.get("sample"):
            console.print(f"{r['stage']}: {r['sample']!r}", markup=False, highlight=False)


def write(run_dir: str, rows: list[dict]) -> None:
    artifacts.atomic_write_json(os.path.join(run_dir, "report.json"), rows)
    artifacts.atomic_write_text(os.path.join(run_dir, "report.md"), markdown(rows))
    plot(run_dir, rows)
    print_table(rows, title=os.path.basename(os.path.normpath(run_dir)))


def loss_curve(stage_dir: str, key: str = "train/loss") -> tuple[list[int], list[float]]:
    """A logged loss per step. A resumed stage logs again the steps after its last checkpoint: the rerun wins."""
    path = os.path.join(stage_dir, "logs", "metrics.csv")
    loss_at: dict[int, float] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for record in csv.DictReader(f):
                if record.get(key):
                    loss_at[int(record["step"])] = float(record[key])
    steps = sorted(loss_at)
    return steps, [loss_at[step] for step in steps]


def plot(run_dir: str, rows: list[dict]) -> None:
    """Perplexity (a classifier: accuracy) against size on disk per stage, and the training stages'
    cross-entropy on their own training batches (for distillation, the hard-label part of its loss: the
    KD term is another quantity)."""
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
        steps, losses = loss_curve(r["stage_dir"], "train/hard_loss" if r["kind"] == "distill" else "train/loss")
        if steps:
            right.plot(steps, losses, label=r["stage"])
    right.set(xlabel="step", ylabel="train cross-entropy", title="training cross-entropy (each stage's own batches)")
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
