"""What every benchmark table shares: the machine's load, the Markdown and JSON files of a table, a
timing callback, and the stage runs the compression tables are made of.

A table is a function that measures and returns rows, plus `write_table`, which writes
outputs/bench/<name>.json (rows, caption, machine) and <name>.md. Benchmarks use the library's public
functions (framework.compose, framework.stages, framework.training); the library never imports them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Sequence

import lightning.pytorch as pl

from framework.artifacts import atomic_write_json, atomic_write_text
from framework.hardware import machine_info
from framework.report import markdown_table

log = logging.getLogger(__name__)

BENCH_DIR = os.path.join("outputs", "bench")


def warn_if_busy() -> float:
    """The 1-minute load average; a warning when other jobs use the CPU, which makes every timing low and noisy.

    Mostly worse for the fp32 runs: torch's threads wait on the busy cores (seen: 20x slower).
    """
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.1f on %d cores: other jobs are using the CPU, timings will be off", load, os.cpu_count())
    return load


# --- tables --------------------------------------------------------------------------------------------------


def format_value(value) -> str:
    """Floats from 10 up as whole numbers (rates), smaller ones to 3 significant digits (ratios, losses).

    None is a cell that does not apply (the reference row has no stage to time).
    """
    if value is None:
        return "—"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if abs(value) >= 10 else f"{value:#.3g}"
    return str(value)


def write_table(name: str, rows: Sequence[dict], columns: dict[str, str], caption: str, meta: dict | None = None, out_dir: str = BENCH_DIR) -> str:
    """Write <out_dir>/<name>.json and <name>.md (each atomically); returns the Markdown.

    The JSON holds the columns as [key, header] pairs: it is written with sorted keys, which would lose their order.
    """
    markdown = markdown_table(rows, columns, format_value) + f"\n{caption}\n"
    record = {
        "name": name, "caption": caption, "columns": [[key, header] for key, header in columns.items()],
        "rows": list(rows), "machine": machine_info(), **(meta or {}),
    }
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), record)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), markdown)
    return markdown


# --- timing ---------------------------------------------------------------------------------------------------


def window_tokens_per_s(step_ends: Sequence[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s from the end of step `warmup` to the end of the last step (the warm-up steps are not timed)."""
    if not 1 <= warmup < len(step_ends):
        raise ValueError(f"need at least one warm-up and one timed step, got warm-up {warmup} of {len(step_ends)} steps")
    timed = len(step_ends) - warmup
    return timed * tokens_per_step / (step_ends[-1] - step_ends[warmup - 1])


class StepEnds(pl.Callback):
    """The time at which each training step ends (after the optimizer step), for `window_tokens_per_s`."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
