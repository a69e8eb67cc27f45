"""What every recipe does around its work: show the resolved config, turn known failures into one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from framework.callbacks import NonFiniteLossError
from framework.config import ConfigError

# Exit codes a script or scheduler can tell apart.
EXIT_CONFIG, EXIT_NONFINITE = 2, 3


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
        if key == "hydra":
            continue
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch = tree.add(f"[bold cyan]{key}")
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console(stderr=True).print(tree)


def run_recipe(work: Callable[[], object], cfg: DictConfig, title: str) -> object:
    """Print the config, run `work`, and report bad input as `error: <key>: <what is allowed>`."""
    quiet_libraries()
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation that cannot resolve names its key
        _fail(f"config: {str(err).splitlines()[0]}", EXIT_CONFIG)
    print_config(cfg, title)
    try:
        return work()
    except ConfigError as err:
        _fail(str(err), EXIT_CONFIG)
    except NonFiniteLossError as err:
        _fail(str(err), EXIT_NONFINITE)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
