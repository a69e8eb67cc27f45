"""Who this process is in a multi-process run: ranks as set by our launcher, torchrun, Slurm or by hand."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from framework.errors import ConfigError

MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed", "model_parallel")


def is_rank_zero() -> bool:
    """Whether this process is (or will be) global rank 0, from what the launcher set: ours, torchrun,
    Slurm, or NODE_RANK for a command run by hand on each node. True when not distributed."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def launched_externally() -> bool:
    """True when torchrun, srun or the user started one process per rank already."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def local_world_size(cfg: DictConfig) -> int:
    """Processes this node runs for the stage: trainer.devices under a multi-process strategy, else 1."""
    if cfg.strategy.name not in MULTI_PROCESS_STRATEGIES:
        return 1
    devices = cfg.trainer.devices
    if devices in (-1, "-1", "auto"):
        import torch

        return max(1, torch.cuda.device_count())
    if isinstance(devices, int) or str(devices).isdigit():
        return int(devices)
    raise ConfigError("trainer.devices", f"'{devices}' is not a device count; strategy={cfg.strategy.name} needs an integer")
