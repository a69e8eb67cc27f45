"""Hydra multiruns (grid sweeps): each job's status in its directory, and a summary of the sweep."""

from __future__ import annotations

import json
import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework import artifacts, report
from framework.training.mlflow_tracking import enabled, end_run, nest_under, open_parent_run, read_record, record_job


def _multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return config.hydra.mode == RunMode.MULTIRUN


class JobSummary(Callback):
    """In a multirun, record each job's status in its directory and refresh sweep_summary.md.

    Written after every job (also by jobs on other machines), so the summary is there when a job
    fails and Hydra stops before its end-of-sweep callbacks. With logger=mlflow the sweep is one
    parent run (recorded in the sweep directory, so that jobs elsewhere find it) and each job a run
    nested under it, with its overrides as params, its val loss and perplexity, and its state.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _sweep_run(config)  # before any job starts, so that jobs running at once find the same one

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if _multirun(config):
            nest_under(_sweep_run(config))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if not _multirun(config):
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
        metrics = artifacts.read_metrics(job_dir) if os.path.isfile(os.path.join(job_dir, artifacts.METRICS)) else {}
        params = dict(override.split("=", 1) for override in job_return.overrides or [] if "=" in override)
        scores = {key: metrics[key] for key in ("val_loss", "val_ppl") if key in metrics}
        record_job(config.get("logger"), job_dir, os.path.basename(job_dir), status["status"], params, scores, status["error"])
        if enabled(config.get("logger")):  # ended after every job: Hydra skips its end-of-sweep callbacks when a job failed
            end_run(config.logger, read_record(config.hydra.sweep.dir).get("mlflow_run_id"), "FINISHED")


def _sweep_run(config: DictConfig) -> str | None:
    """The sweep's MLflow parent run (recorded in the sweep directory), running; None without MLflow."""
    return open_parent_run(config.get("logger"), f"{config.hydra.job.name}-sweep", config.hydra.sweep.dir, kind="sweep")


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
