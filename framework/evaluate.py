"""Evaluate an artifact on the configured data, or rebuild the report of a pipeline run directory."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

from framework import artifacts, report
from framework.config import StageConfig, to_schema
from framework.data import LMDataModule, check_data_config, load_documents
from framework.errors import ConfigError
from framework.evaluation import model_metrics
from framework.models import build_model_and_tokenizer
from framework.stages.base import artifact_model


def evaluate(cfg: DictConfig) -> dict:
    """Measure the artifact `cfg.input` (results in cfg.run_dir/evaluation.json, never in the input), or,
    given a pipeline's run directory, rebuild its report from its stages' artifacts."""
    source = cfg.get("input")
    if not source:
        raise ConfigError("input", "name an artifact (a stage's directory) or a pipeline run directory: input=<dir>")
    if os.path.isdir(source) and not artifacts.is_complete(source) and report.stage_dirs(source):
        return {"rows": report.rebuild(source)}
    artifacts.check_artifact(source, "input")
    typed = to_schema(OmegaConf.create({k: cfg[k] for k in StageConfig.__dataclass_fields__ if k in cfg}), StageConfig)
    with open_dict(typed):
        typed.model = artifact_model(source)
    check_data_config(typed.data)
    documents = load_documents(typed.data)
    model, tokenizer = build_model_and_tokenizer(typed.model, typed.paths.cache_dir)
    datamodule = LMDataModule(typed.data, tokenizer, typed.paths.cache_dir, typed.seed, documents)
    metrics = model_metrics(model, datamodule.val_blocks(), typed.data.batch_size)
    metrics.update(size_bytes=artifacts.directory_size(os.path.join(source, artifacts.MODEL)), data=typed.data.name)
    artifacts.atomic_write_json(os.path.join(typed.run_dir, "evaluation.json"), metrics)
    report.print_table([report.row(os.path.basename(os.path.normpath(source)), "evaluate", source, metrics, False, 0.0)], "evaluation")
    return metrics
