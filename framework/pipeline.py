"""Run a pipeline's stages in order, handing artifacts on; skip what is done, resume what was cut.

Every stage is composed and fully validated first (types, ranges, the machine, that `input` / `teacher`
name an earlier stage whose model this stage can read), so a mistake anywhere fails before the first
stage starts. A stage's fingerprint includes the previous stage's fingerprint, so changing one stage's
settings reruns that stage and every stage after it, and nothing before it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from framework import artifacts, report
from framework.compose import compose
from framework.config import unknown_key_message
from framework.errors import ConfigError
from framework.launch import run_stage
from framework.stages import STAGES
from framework.training.mlflow_tracking import parent_run

log = logging.getLogger(__name__)

SPEC_KEYS = ("kind", "input", "teacher", "groups")  # what a stage entry says besides config values


@dataclass
class PlannedStage:
    name: str
    kind: str
    stage_dir: str
    config: DictConfig  # validated
    output_format: str


def compose_stage(name: str, spec: DictConfig, pipeline_cfg: DictConfig, stage_dir: str) -> DictConfig:
    """The full config of one stage: its kind's config with the stage's group choices, then its values."""
    kind = spec.get("kind")
    choices = spec.get("groups") or {}
    try:
        task = [] if "task" in choices else [f"task={pipeline_cfg.task.name}"]  # the pipeline's task, unless the stage names one
        cfg = compose(kind, [*task, *(f"{g}={c}" for g, c in choices.items()), f"run_dir={stage_dir}"])
    except ConfigError as err:  # an unknown option in the stage's groups, most often
        raise err.under(f"pipeline.stages.{name}.groups") from None
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
        message = str(err).splitlines()[0]
        if "not in struct" in message or ("Key '" in message and "not in" in message):
            parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg
            message = unknown_key_message(key.split(".")[-1], [str(k) for k in parent.keys()])
        raise ConfigError(f"pipeline.stages.{name}.{key}".rstrip("."), message) from None


def plan(cfg: DictConfig) -> list[PlannedStage]:
    """Compose and validate every stage of `cfg.pipeline`, in order, before anything runs."""
    planned: dict[str, PlannedStage] = {}
    eval_data = evaluation_set(cfg)
    for name, spec in cfg.pipeline.stages.items():
        kind = spec.get("kind")
        if kind not in STAGES:
            raise ConfigError(f"pipeline.stages.{name}.kind", f"'{kind}' is not one of {', '.join(STAGES)}")
        stage = STAGES[kind]
        stage_dir = os.path.join(cfg.run_dir, name)
        composed = compose_stage(name, spec, cfg, stage_dir)
        if eval_data is not None:
            with open_dict(composed):
                composed.eval_data = eval_data
        inputs, input_format = _connect_inputs(name, spec, stage, composed, planned)
        try:
            validated = stage.validate(composed, planned_inputs=inputs)
        except ConfigError as err:
            raise err.under(f"pipeline.stages.{name}") from None
        planned[name] = PlannedStage(name, kind, stage_dir, validated, stage.output_format(validated, input_format))
    return list(planned.values())


def evaluation_set(cfg: DictConfig) -> DictConfig | None:
    """The data every stage's final metrics are measured on (the val split of the data of the stage that
    `pipeline.evaluate_on` names), so that the stages' perplexities compare; None: each stage's own."""
    name = cfg.pipeline.get("evaluate_on")
    if name is None:
        return None
    if name not in cfg.pipeline.stages:
        raise ConfigError("pipeline.evaluate_on", f"'{name}' is not a stage (stages: {', '.join(cfg.pipeline.stages)})")
    return compose_stage(name, cfg.pipeline.stages[name], cfg, os.path.join(cfg.run_dir, name)).data


def _connect_inputs(name: str, spec: DictConfig, stage, cfg: DictConfig, planned: dict[str, PlannedStage]):
    """Point the stage's input key at the artifact of the earlier stage it names; return the planned
    input formats ({input key: format}) and the input's format."""
    spec_key = "teacher" if stage.input_key == "distill.teacher" and spec.get("teacher") else "input"
    source = spec.get(spec_key)
    if source is None:
        if stage.reads and stage.input_required:
            raise ConfigError(f"pipeline.stages.{name}.input", f"a {stage.kind} stage needs an input stage (earlier: {', '.join(planned) or 'none'})")
        return {}, None
    if source not in planned:
        raise ConfigError(f"pipeline.stages.{name}.{spec_key}", f"'{source}' is not an earlier stage (earlier: {', '.join(planned) or 'none'})")
    upstream = planned[source]
    stage.check_input_format(upstream.output_format, f"pipeline.stages.{name}.{spec_key}", source)
    with open_dict(cfg):
        OmegaConf.update(cfg, stage.input_key, upstream.stage_dir, force_add=True)
        cfg.logger.uses = [planned[spec[k]].stage_dir for k in ("input", "teacher") if spec.get(k)]
    return {stage.input_key: upstream.output_format}, upstream.output_format


def run_pipeline(cfg: DictConfig) -> list[dict]:
    """Run every stage of `cfg.pipeline` into `cfg.run_dir/<stage>`; returns the report rows."""
    stages = plan(cfg)
    rows, previous = [], []
    # With logger=mlflow the pipeline is one parent run, named after it; each stage's run nests under it.
    with parent_run(cfg.logger, cfg.pipeline.name, cfg.run_dir, kind="pipeline") as tracked:
        for stage in stages:
            done_before = _complete_mtime(stage.stage_dir)
            started = time.perf_counter()
            log.info("stage %s (%s)", stage.name, stage.kind)
            metrics = run_stage(stage.kind, stage.config, stage.stage_dir, previous)
            cached = done_before is not None and done_before == _complete_mtime(stage.stage_dir)
            rows.append(report.row(stage.name, stage.kind, stage.stage_dir, metrics, cached, time.perf_counter() - started))
            previous = [artifacts.read_fingerprint(stage.stage_dir)]
        report.write(cfg.run_dir, rows)
        tracked.log_files(os.path.join(cfg.run_dir, name) for name in ("report.md", "report.json", "report.png"))
    return rows


def _complete_mtime(stage_dir: str) -> float | None:
    path = os.path.join(stage_dir, artifacts.COMPLETE)
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None
