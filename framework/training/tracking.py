"""Experiment tracking: CSV always, plus wandb (offline unless asked), MLflow or TensorBoard; lineage between stages.

A stage's tracker runs outlive its process: their ids are kept with its checkpoints (`checkpoints/tracking.json`,
with the fingerprint of the config they belong to), so a resumed stage continues the same runs, and its
`logs/metrics.csv` keeps the rows logged before the interruption. A resumed stage trains again the steps
after its last checkpoint; every tracker leaves out the steps it holds already (`new_metrics`: MLflow as its
server says, the others as the CSV log says), so no step is logged twice. MLflow's runs, its parent runs (a
pipeline, a sweep, a study) among them, are made in framework.training.mlflow_tracking.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import uuid
from typing import Any, Mapping, Sequence

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from framework import artifacts
from framework.config import one_of
from framework.distributed import is_rank_zero
from framework.training import mlflow_tracking
from framework.training.mlflow_tracking import CHECKPOINTS, read_record, status_of

LOGGERS = ("csv", "wandb", "mlflow", "tensorboard")


def check_logger_config(logger_cfg: DictConfig) -> None:
    one_of("logger.name", logger_cfg.name, LOGGERS)
    one_of("logger.mode", logger_cfg.mode, ("offline", "online", "disabled"))
    if logger_cfg.name == "mlflow":
        mlflow_tracking.check_server(logger_cfg.tracking_uri)


def wandb_mode(logger_cfg: DictConfig) -> str:
    """WANDB_MODE in the environment wins over the config, so CI and tests can force offline."""
    return os.environ.get("WANDB_MODE") or logger_cfg.mode


# --- steps already logged ------------------------------------------------------------------------------------


def csv_logged_steps(csv_path: str) -> dict[str, int]:
    """The last step logged for each metric in a stage's metrics.csv (empty when there is none)."""
    last: dict[str, int] = {}
    if not os.path.isfile(csv_path):
        return last
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue  # a line cut short by a kill
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    last[key] = max(last.get(key, -1), step)
    return last


def new_metrics(metrics: Mapping[str, Any], step: int | None, logged: Mapping[str, int]) -> dict[str, Any]:
    """The metrics of a step not logged before this process (a resumed stage replays a few steps)."""
    if step is None:
        return dict(metrics)
    return {key: value for key, value in metrics.items() if step > logged.get(key, -1)}


class SkipLoggedSteps:
    """A Lightning logger that leaves out the metrics of steps logged before a resume (`logged`)."""

    logged: Mapping[str, int] = {}

    def log_metrics(self, metrics, step=None):
        metrics = new_metrics(metrics, step, self.logged)
        if metrics:
            super().log_metrics(metrics, step)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv (a resumed stage lost its earlier rows):
    this one appends to it, keeping its columns."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            self.metrics_keys = self._header()

    def _header(self) -> list[str]:
        with open(self.metrics_file_path, newline="") as f:
            return [key for key in next(csv.reader(f), []) if key]

    def save(self) -> None:
        # Another process may have added columns since this writer last looked: under ddp_spawn the parent logs
        # the start and the end of a stage and a spawned worker the steps between, into one file.
        if self.metrics and os.path.isfile(self.metrics_file_path):
            header = self._header()
            if set(header) != set(self.metrics_keys):
                self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
                self._rewrite_with_new_header(self.metrics_keys)
        super().save()


class StageCSVLogger(SkipLoggedSteps, CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class StageTensorBoardLogger(SkipLoggedSteps, TensorBoardLogger):
    pass


class StageWandbLogger(WandbLogger):
    """Logs with explicit steps: a resumed offline run starts wandb's own step counter at 0 again."""

    logged: Mapping[str, int] = {}

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        metrics = new_metrics(metrics, step, self.logged)
        if metrics and step is not None:
            self.experiment.log({**metrics, "trainer/global_step": step}, step=step)
        elif metrics:
            self.experiment.log(metrics)


class StageMLflowLogger(SkipLoggedSteps, MLFlowLogger):
    """Metrics into a run opened beforehand (mlflow_tracking.open_stage_run); the params were logged there,
    flattened, and the stage ends the run itself, after its artifact is logged."""

    def log_hyperparams(self, params) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


# --- a stage's loggers ---------------------------------------------------------------------------------------


def stage_record(stage_dir: str, fingerprint: str) -> dict | None:
    """The tracker run ids kept with the stage's checkpoints, when they belong to this config."""
    record = read_record(os.path.join(stage_dir, CHECKPOINTS))
    return record if record.get("fingerprint") == fingerprint else None


def save_stage_record(stage_dir: str, record: dict) -> None:
    artifacts.atomic_write_json(os.path.join(stage_dir, CHECKPOINTS, mlflow_tracking.RECORD), record)


def stage_name(logger_cfg: DictConfig, stage_dir: str, part_of: str | None = None) -> str:
    """The stage's name (its pipeline stage, else its directory); a part of a stage (distill's baseline) adds its own."""
    stage = logger_cfg.run_name or os.path.basename(os.path.normpath(part_of or stage_dir))
    return f"{stage}-{os.path.basename(os.path.normpath(stage_dir))}" if part_of else stage


def lineage_tags(logger_cfg: DictConfig, fingerprint: str, kind: str | None) -> dict[str, str]:
    """kind, fingerprint, and for each input stage its name and fingerprint (`input.<name>`)."""
    inputs = {os.path.basename(os.path.normpath(d)): artifacts.read_fingerprint(d) or "" for d in logger_cfg.uses}
    tags = {"fingerprint": fingerprint, "inputs": ",".join(inputs), **{f"input.{name}": fp for name, fp in inputs.items()}}
    return {**tags, "kind": kind} if kind else tags


def build_loggers(
    logger_cfg: DictConfig, stage_dir: str, fingerprint: str, job_type: str, config: dict[str, Any], part_of: str | None = None
) -> list[Logger]:
    """Loggers for one stage. `part_of`: the directory of the stage this run is a part of (distill's baseline
    is a part of distill), whose MLflow run it nests under.

    The tracker runs recorded for this config are continued, else new ones are started (and an old
    metrics.csv, of another config, starts afresh).
    """
    record = (stage_record(stage_dir, fingerprint) if is_rank_zero() else {}) or {}
    if is_rank_zero() and not record:  # a new run: the logs of another config's go
        record = {"fingerprint": fingerprint}
        shutil.rmtree(os.path.join(stage_dir, "tensorboard"), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(stage_dir, "logs", "metrics.csv"))
    logged = csv_logged_steps(os.path.join(stage_dir, "logs", "metrics.csv"))
    name = stage_name(logger_cfg, stage_dir, part_of)
    # Written at every call, before the other trackers': the record of the steps logged (MLflow keeps its own).
    loggers: list[Logger] = [StageCSVLogger(save_dir=stage_dir, name="logs", version="", flush_logs_every_n_steps=1)]
    if logger_cfg.name == "tensorboard":
        loggers.append(StageTensorBoardLogger(save_dir=stage_dir, name="tensorboard", version=""))
    if logger_cfg.name == "wandb":
        record.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        loggers.append(
            StageWandbLogger(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                name=name,
                group=logger_cfg.group,
                tags=list(logger_cfg.tags),
                job_type=job_type,
                # The same id on resume: online, wandb continues the run; offline, it writes another directory
                # of the same run, and `wandb sync` of both makes one run.
                id=record["wandb_run_id"],
                resume="allow",
                save_dir=stage_dir,
                mode=wandb_mode(logger_cfg),
                config=config,
            )
        )
    for logger in loggers:
        logger.logged = logged
    if logger_cfg.name == "mlflow":
        run_id = None
        if is_rank_zero():
            tags = lineage_tags(logger_cfg, fingerprint, job_type)
            params = mlflow_tracking.flat_params(config)
            parent = _enclosing_run(logger_cfg, part_of, fingerprint, params) if part_of else None
            run_id = record["mlflow_run_id"] = mlflow_tracking.open_stage_run(logger_cfg, record.get("mlflow_run_id"), name, tags, params, parent)
        mlflow_logger = StageMLflowLogger(tracking_uri=logger_cfg.tracking_uri, run_id=run_id)
        # The server's own record of the steps: a kill between a CSV row and its MLflow call leaves that step to log.
        mlflow_logger.logged = mlflow_tracking.logged_steps(logger_cfg, run_id) if run_id else {}
        loggers.append(mlflow_logger)
    if is_rank_zero():
        save_stage_record(stage_dir, record)
    return loggers


def _enclosing_run(logger_cfg: DictConfig, stage_dir: str, fingerprint: str, params: dict[str, str]) -> str:
    """The MLflow run of the stage a part belongs to, opened before that stage's own training starts."""
    record = stage_record(stage_dir, fingerprint) or {"fingerprint": fingerprint}
    tags = lineage_tags(logger_cfg, fingerprint, None)
    record["mlflow_run_id"] = mlflow_tracking.open_stage_run(logger_cfg, record.get("mlflow_run_id"), stage_name(logger_cfg, stage_dir), tags, params)
    save_stage_record(stage_dir, record)
    return record["mlflow_run_id"]


def log_stage_artifact(loggers: Sequence[Logger], logger_cfg: DictConfig, stage_dir: str, metrics: dict, fingerprint: str, part_of: str | None = None) -> None:
    """Log the stage's artifact, naming the artifacts it was made from (its lineage).

    wandb: the weights are added as a reference (they stay in the run directory). wandb cannot record
    `use_artifact` offline, so the inputs are also written into the artifact's metadata; online, the
    inputs are used for real and the lineage graph shows in the UI.
    MLflow: its files and model are uploaded to the stage's run, and the model registered.
    """
    name = artifact_name(logger_cfg, stage_name(logger_cfg, stage_dir, part_of))
    for logger in loggers:
        if isinstance(logger, StageMLflowLogger) and logger.run_id:
            tags = {"fingerprint": fingerprint, "kind": str(metrics.get("kind", ""))}
            # a part of a stage (distill's baseline) is there to compare with: its model is not registered
            mlflow_tracking.log_stage_files(logger_cfg, logger.run_id, stage_dir, None if part_of else name, tags)
    wandb_logger = next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    uses = [artifact_name(logger_cfg, os.path.basename(os.path.normpath(d))) for d in logger_cfg.uses]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    artifact = wandb.Artifact(name, type="model", metadata={"metrics": numbers, "uses": uses, "fingerprint": fingerprint})
    artifact.add_file(os.path.join(stage_dir, "metrics.json"))
    artifact.add_reference(f"file://{os.path.abspath(os.path.join(stage_dir, 'model'))}", name="model", checksum=False)
    if wandb_mode(logger_cfg) == "online":
        for used in uses:
            run.use_artifact(f"{used}:latest")
    run.log_artifact(artifact, aliases=["latest", fingerprint[:12]])


def artifact_name(logger_cfg: DictConfig, stage: str) -> str:
    """wandb allows letters, digits, '-', '_' and '.' (a run directory named after overrides has '=' and ',');
    MLflow's registered models use the same names."""
    name = f"{logger_cfg.group}-{stage}" if logger_cfg.group else stage
    return re.sub(r"[^\w.-]", "_", name)


def finish(loggers: Sequence[Logger], logger_cfg: DictConfig, error: BaseException | None = None) -> None:
    """End the stage's runs: MLflow's with the status `error` implies; wandb's too, so that the next stage
    or sweep job starts its own (WandbLogger reuses wandb.run)."""
    for logger in loggers:
        if isinstance(logger, StageMLflowLogger) and logger.run_id:
            mlflow_tracking.end_run(logger_cfg, logger.run_id, status_of(error))
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish(exit_code=0 if error is None else 1)
