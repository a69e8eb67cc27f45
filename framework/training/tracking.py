"""Experiment tracking: CSV always, plus wandb (offline unless asked) or TensorBoard; lineage between stages."""

from __future__ import annotations

import os
import re
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

from framework.config import one_of

LOGGERS = ("csv", "wandb", "tensorboard")


def check_logger_config(logger_cfg: DictConfig) -> None:
    one_of("logger.name", logger_cfg.name, LOGGERS)
    one_of("logger.mode", logger_cfg.mode, ("offline", "online", "disabled"))


def wandb_mode(logger_cfg: DictConfig) -> str:
    """WANDB_MODE in the environment wins over the config, so CI and tests can force offline."""
    return os.environ.get("WANDB_MODE") or logger_cfg.mode


def build_loggers(logger_cfg: DictConfig, stage_dir: str, run_id: str, job_type: str, config: dict[str, Any]) -> list[Logger]:
    """Loggers for one stage. `run_id` is stable for the stage, so a resumed stage continues its wandb run."""
    # Flushed every 10 steps, not Lightning's 100, so `tail -f logs/metrics.csv` follows a run.
    loggers: list[Logger] = [CSVLogger(save_dir=stage_dir, name="logs", version="", flush_logs_every_n_steps=10)]
    if logger_cfg.name == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=stage_dir, name="tensorboard", version=""))
    if logger_cfg.name == "wandb":
        mode = wandb_mode(logger_cfg)
        loggers.append(
            WandbLogger(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                name=logger_cfg.run_name or os.path.basename(os.path.normpath(stage_dir)),
                group=logger_cfg.group,
                tags=list(logger_cfg.tags),
                job_type=job_type,
                # Online, a resumed stage continues its run. Offline runs are local files that a killed
                # process may still hold, so a resumed stage starts a new one.
                id=run_id if mode == "online" else None,
                resume="allow" if mode == "online" else None,
                save_dir=stage_dir,
                mode=mode,
                config=config,
            )
        )
    return loggers


def log_stage_artifact(loggers: list[Logger], logger_cfg: DictConfig, stage_dir: str, metrics: dict, fingerprint: str) -> None:
    """Log the stage's artifact to wandb, naming the artifacts it was made from (its lineage).

    The weights are added as a reference (they stay in the run directory). wandb cannot record
    `use_artifact` offline, so the inputs are also written into the artifact's metadata; online,
    the inputs are used for real and the lineage graph shows in the UI.
    """
    wandb_logger = next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    name = artifact_name(logger_cfg, logger_cfg.run_name or os.path.basename(os.path.normpath(stage_dir)))
    uses = [artifact_name(logger_cfg, stage) for stage in logger_cfg.uses]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    artifact = wandb.Artifact(name, type="model", metadata={"metrics": numbers, "uses": uses, "fingerprint": fingerprint})
    artifact.add_file(os.path.join(stage_dir, "metrics.json"))
    artifact.add_reference(f"file://{os.path.abspath(os.path.join(stage_dir, 'model'))}", name="model", checksum=False)
    if wandb_mode(logger_cfg) == "online":
        for used in uses:
            run.use_artifact(f"{used}:latest")
    run.log_artifact(artifact, aliases=["latest", fingerprint[:12]])


def artifact_name(logger_cfg: DictConfig, stage: str) -> str:
    """wandb allows letters, digits, '-', '_' and '.' (a run directory named after overrides has '=' and ',')."""
    name = f"{logger_cfg.group}-{stage}" if logger_cfg.group else stage
    return re.sub(r"[^\w.-]", "_", name)


def finish(loggers: list[Logger]) -> None:
    """Close the wandb run so the next stage or sweep job starts its own (WandbLogger reuses wandb.run)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
