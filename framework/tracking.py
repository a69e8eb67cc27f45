"""Experiment tracking: CSV always, plus wandb (offline unless asked) or TensorBoard; lineage between stages."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig


def wandb_mode(logger_cfg: DictConfig) -> str:
    """WANDB_MODE in the environment wins over the config, so CI and tests can force offline."""
    return os.environ.get("WANDB_MODE") or logger_cfg.mode


def build_loggers(logger_cfg: DictConfig, stage_dir: str, run_id: str, job_type: str, config: dict[str, Any]) -> list[Logger]:
    """Loggers for one stage. `run_id` is stable for the stage, so a resumed stage continues its wandb run."""
    loggers: list[Logger] = [CSVLogger(save_dir=stage_dir, name="logs", version="")]
    if logger_cfg.name == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=stage_dir, name="tensorboard", version=""))
    if logger_cfg.name == "wandb":
        loggers.append(
            WandbLogger(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                name=logger_cfg.run_name or os.path.basename(os.path.normpath(stage_dir)),
                group=logger_cfg.group,
                tags=list(logger_cfg.tags),
                job_type=job_type,
                id=run_id,
                resume="allow",
                save_dir=stage_dir,
                mode=wandb_mode(logger_cfg),
                config=config,
            )
        )
    return loggers


def finish(loggers: list[Logger]) -> None:
    """Close the wandb run so the next stage or sweep job starts its own (WandbLogger reuses wandb.run)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
