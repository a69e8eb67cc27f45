"""Evaluate an artifact (of any format, in the runtime that format targets) on the configured data, or rebuild
the report of a pipeline run directory."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from framework import artifacts, report
from framework.config import StageConfig, to_schema
from framework.data import LMDataModule, check_data_config, load_documents
from framework.errors import ConfigError
from framework.evaluation import SPEED_THREADS, model_metrics
from framework.runtimes import open_runtime


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
    check_data_config(typed.data)
    from transformers import AutoTokenizer

    model_dir = os.path.join(source, artifacts.MODEL)
    documents = load_documents(typed.data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    datamodule = LMDataModule(typed.data, tokenizer, typed.paths.cache_dir, typed.seed, documents)
    # In the runtime the artifact's format targets; parameters as the stage counted them (an ONNX or GGUF
    # runtime does not expose them), unless there is a torch model to count.
    stored = artifacts.read_metrics(source)
    metrics = {k: stored[k] for k in ("params_total", "params_nonzero", "sparsity") if k in stored}
    metrics.update(model_metrics(open_runtime(model_dir, SPEED_THREADS), datamodule.val_blocks(), typed.data.batch_size, tokenizer))
    metrics.update(size_bytes=artifacts.directory_size(model_dir), data=typed.data.name)
    artifacts.atomic_write_json(os.path.join(typed.run_dir, "evaluation.json"), metrics)
    report.print_table([report.row(os.path.basename(os.path.normpath(source)), "evaluate", source, metrics, False, 0.0)], "evaluation")
    return metrics
