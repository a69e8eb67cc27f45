"""Hydra multiruns (grid sweeps): each job's status in its directory, and a summary of the sweep."""

from __future__ import annotations

import json
import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework import artifacts, report


class JobSummary(Callback):
    """In a multirun, record each job's status in its directory and refresh sweep_summary.md.

    Written after every job (also by jobs on other machines), so the summary is there when a job
    fails and Hydra stops before its end-of-sweep callbacks.
    """

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        status = {
            "overrides": " ".join(job_return.overrides or []),
            "status": job_return.status.name,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if failed else "",
        }
        job_dir = config.hydra.runtime.output_dir
        artifacts.atomic_write_json(os.path.join(job_dir, "job_status.json"), status)
        write_sweep_summary(config.hydra.sweep.dir)


def write_sweep_summary(sweep_dir: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        job_dir = os.path.join(sweep_dir, name)
        path = os.path.join(job_dir, "job_status.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            row = json.load(f)
        metrics = artifacts.read_metrics(job_dir) if os.path.isfile(os.path.join(job_dir, artifacts.METRICS)) else {}
        row = {"job": name, **row, "val_loss": metrics.get("val_loss"), "val_ppl": metrics.get("val_ppl")}
        rows.append(row)
    artifacts.atomic_write_text(os.path.join(sweep_dir, "sweep_summary.md"), report.markdown_table(rows))
    return rows
