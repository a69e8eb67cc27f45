"""What every recipe does around its work: compose, check, show the resolved config, run, and turn the
failures a user can fix into one line and an exit code."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.compose import composition_error, conf_dir, in_multirun, register
from framework.environment import quiet_libraries
from framework.errors import EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_STORAGE, ConfigError, NonFiniteLossError, PreemptedError, StorageError
from framework.launch import run_stage
from framework.stages import STAGES

# Slurm signals a job shortly before its time limit; submitit requeues it on this signal: SIGUSR1 (Lightning's
# default, which training.callbacks.RequeueOnSignal handles) instead of submitit's USR2. Set at import, before
# Hydra's submitit launcher imports submitit, and inherited by the jobs it submits.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
# A recipe starts a wandb service of its own, not the one of the process that started it (WANDB_SERVICE): a run
# of a killed recipe stays "in use" in a service that outlives it, and its resume would be refused.
os.environ.pop("WANDB_SERVICE", None)


def hydra_main(config_name: str):
    """`@hydra.main` on conf/<config_name>.yaml, wherever conf/ is, with our resolvers and schemas registered.

    A mistake on the command line (an unknown option or key, a wrong type) is one line naming the key and
    exit code 2, not Hydra's several lines and exit 1: Hydra is told to raise its errors (HYDRA_FULL_ERROR),
    and they are reported here.
    """
    register()

    def decorate(main: Callable[[DictConfig], object]):
        hydra_entry = hydra.main(config_path=conf_dir(), config_name=config_name, version_base="1.3")(main)

        @functools.wraps(main)
        def entry() -> None:
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                hydra_entry()
            except ConfigError as err:  # a failed job of a multirun, raised again by Hydra at the end
                _exit_with(str(err), EXIT_CONFIG)
            except (HydraException, OmegaConfBaseException) as err:
                _exit_with(str(composition_error(err, config_name, [a for a in sys.argv[1:] if not a.startswith("-")])), EXIT_CONFIG)
            except OSError as err:  # Hydra creating the run directory, or a file of ours: permission, disk full
                _exit_with(f"{err.filename or 'a file'}: {err.strerror or err}", EXIT_STORAGE)

        return entry

    return decorate


def print_config(cfg: DictConfig, title: str = "config") -> None:
    """The resolved config as a tree, one branch per section; unset (null) values are left out."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree(f"[bold]{title}")
    for key, value in cfg.items():
        if key == "hydra" or value is None:
            continue
        text = OmegaConf.to_yaml(_without_nulls(OmegaConf.to_container(value, resolve=True))) if isinstance(value, DictConfig) else str(value)
        branch = tree.add(f"[bold cyan]{key}")
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console(stderr=True).print(tree)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def run_recipe(work: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run `work(cfg)`, or a hyperparameter search over it; report bad input in one line.

    Errors read `error: <key>: <what is allowed>`. In a Hydra multirun the failure is raised instead
    of exiting, so that the sweep records this job as failed and goes on with the others.
    """
    quiet_libraries()
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation that cannot resolve names its key
        _fail(f"config: {str(err).splitlines()[0]}", EXIT_CONFIG, err)
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
    except StorageError as err:
        _fail(str(err), EXIT_STORAGE, err)


def run_stage_recipe(kind: str, cfg: DictConfig) -> object:
    """The recipe of one stage: check everything, show the resolved config, then run it, its processes
    launched as the strategy asks (framework.launch)."""

    def work(composed: DictConfig) -> dict:
        validated = STAGES[kind].validate(composed)
        print_config(validated, kind)
        return run_stage(kind, validated)

    return run_recipe(work, cfg)


def run_function_recipe(function: Callable[[DictConfig], object], cfg: DictConfig, title: str) -> object:
    """The recipe of a plain function of the config (pipeline, evaluate): show the config, then run it."""

    @functools.wraps(function)
    def work(composed: DictConfig):
        print_config(composed, title)
        return function(composed)

    return run_recipe(work, cfg)


def _fail(message: str, code: int, error: Exception) -> None:
    if in_multirun():
        raise error  # the sweep records this job as failed and goes on
    _exit_with(message, code)


def _exit_with(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
