"""Run a pipeline's stages in order, handing artifacts on; skip what is done, resume what was cut.

A stage's fingerprint includes the previous stage's fingerprint, so changing one stage's settings
reruns that stage and every stage after it, and nothing before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from framework import artifacts, report
from framework.config import ConfigError
from framework.launch import run_stage
from framework.stages import STAGES

log = logging.getLogger(__name__)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
SPEC_KEYS = ("kind", "input", "teacher", "groups")  # what a stage entry says besides config values


@contextlib.contextmanager
def _hydra_context():
    """compose() needs an initialized Hydra: the recipe's own inside a Hydra app, else our conf/."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            yield


def compose_stage(name: str, spec: DictConfig, pipeline_cfg: DictConfig, stage_dir: str) -> DictConfig:
    """The full config of one stage: its kind's config with the stage's group choices, then its values."""
    kind = spec.get("kind")
    if kind not in STAGES:
        raise ConfigError(f"pipeline.stages.{name}.kind", f"'{kind}' is not one of {', '.join(STAGES)}")
    choices = spec.get("groups") or {}
    with _hydra_context():
        cfg = compose(config_name=kind, overrides=[*(f"{g}={c}" for g, c in choices.items()), f"run_dir={stage_dir}"])
    # Where every stage runs (precision, strategy, devices), unless the stage chose its own group.
    hardware = OmegaConf.to_container(OmegaConf.masked_copy(pipeline_cfg, ["trainer", *(g for g in ("precision", "strategy") if g not in choices)]))
    values = OmegaConf.masked_copy(spec, [k for k in spec if k not in SPEC_KEYS])
    logger = OmegaConf.merge(
        pipeline_cfg.logger,
        {"group": pipeline_cfg.logger.get("group") or f"pipeline-{pipeline_cfg.pipeline.name}", "run_name": name},
    )
    shared = {"seed": pipeline_cfg.seed, "paths": pipeline_cfg.paths, "logger": logger}
    try:  # the composed config is typed: a misspelt key fails here, naming the stage
        return OmegaConf.merge(cfg, hardware, pipeline_cfg.common, values, shared)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"pipeline.stages.{name}.{key}".rstrip("."), str(err).splitlines()[0]) from None


def _resolve_inputs(name: str, spec: DictConfig, cfg: DictConfig, stage_dirs: dict[str, str]) -> DictConfig:
    """Turn the stage names in `input` / `teacher` into the artifact directories of those stages."""

    def directory(key: str) -> str:
        source = spec[key]
        if source not in stage_dirs:
            raise ConfigError(f"pipeline.stages.{name}.{key}", f"'{source}' is not an earlier stage (earlier: {', '.join(stage_dirs) or 'none'})")
        return stage_dirs[source]

    with open_dict(cfg):
        if spec.kind == "distill":
            cfg.distill.teacher = directory("teacher" if spec.get("teacher") else "input")
        elif spec.get("input"):
            cfg.input = directory("input")
        elif spec.kind != "train":
            raise ConfigError(f"pipeline.stages.{name}.input", f"a {spec.kind} stage needs an input stage")
        cfg.logger.uses = [spec[k] for k in ("input", "teacher") if spec.get(k)]
    return cfg


def run_pipeline(cfg: DictConfig) -> list[dict]:
    """Run every stage of `cfg.pipeline` into `cfg.run_dir/<stage>`; returns the report rows."""
    run_dir = cfg.run_dir
    stages = cfg.pipeline.stages
    configs, stage_dirs = {}, {}
    for name, spec in stages.items():  # compose and check every stage before any heavy work
        stage_dirs[name] = os.path.join(run_dir, name)
        configs[name] = _resolve_inputs(name, spec, compose_stage(name, spec, cfg, stage_dirs[name]), stage_dirs)

    rows, previous = [], []
    for name, spec in stages.items():
        stage_dir = stage_dirs[name]
        done_before = _complete_mtime(stage_dir)
        started = time.perf_counter()
        log.info("stage %s (%s)", name, spec.kind)
        metrics = run_stage(spec.kind, configs[name], stage_dir, previous)
        cached = done_before is not None and done_before == _complete_mtime(stage_dir)
        rows.append(report.row(name, spec.kind, stage_dir, metrics, cached, time.perf_counter() - started))
        previous = [artifacts.read_fingerprint(stage_dir)]
    report.write(run_dir, rows)
    return rows


def _complete_mtime(stage_dir: str) -> float | None:
    path = os.path.join(stage_dir, artifacts.COMPLETE)
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None
