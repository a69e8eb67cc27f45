"""What every recipe does around its work: show the resolved config, turn known failures into one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from framework.callbacks import NonFiniteLossError, PreemptedError
from framework.config import ConfigError, in_multirun

# Slurm signals a job shortly before its time limit; submitit requeues it on this signal: SIGUSR1 (Lightning's
# default, which framework.callbacks.RequeueOnSignal handles) instead of submitit's USR2. Set at import, before
# Hydra's submitit launcher imports submitit, and inherited by the jobs it submits.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

# Exit codes a script or scheduler can tell apart.
EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 4


def quiet_libraries() -> None:
    """Offline by default, and keep the terminal for our own progress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "transformers.modeling_utils", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def print_config(cfg: DictConfig, title: str = "config") -> None:
    """The resolved config as a tree, one branch per group."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree(f"[bold]{title}")
    for key, value in cfg.items():
        if key == "hydra" or value is None:
            continue
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch = tree.add(f"[bold cyan]{key}")
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console(stderr=True).print(tree)


def run_recipe(work: Callable[[DictConfig], object], cfg: DictConfig, title: str) -> object:
    """Print the config, run `work(cfg)` (or a hyperparameter search over it), report bad input in one line.

    Errors read `error: <key>: <what is allowed>`. In a Hydra multirun the failure is raised instead
    of exiting, so that the sweep records this job as failed and goes on with the others.
    """
    quiet_libraries()
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation that cannot resolve names its key
        _fail(f"config: {str(err).splitlines()[0]}", EXIT_CONFIG, err)
    print_config(cfg, title)
    try:
        if cfg.get("hparams_search"):
            from framework.search import run_study

            return run_study(cfg, work)
        return work(cfg)
    except ConfigError as err:
        _fail(str(err), EXIT_CONFIG, err)
    except NonFiniteLossError as err:
        _fail(str(err), EXIT_NONFINITE, err)
    except PreemptedError as err:
        _fail(str(err), EXIT_PREEMPTED, err)


def run_stage_recipe(kind: str, cfg: DictConfig) -> object:
    """The recipe of one stage: its processes launched as the strategy asks (framework.launch)."""
    from framework.launch import run_stage

    return run_recipe(lambda c: run_stage(kind, c), cfg, kind)


def _fail(message: str, code: int, error: Exception) -> None:
    print(f"error: {message}", file=sys.stderr)
    if in_multirun():
        raise error
    sys.exit(code)
