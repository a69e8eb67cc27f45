"""Evaluate an artifact on the configured data, or rebuild the report of a pipeline run directory."""

from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from framework import artifacts, report
from framework.config import StageConfig, to_schema
from framework.data import LMDataModule, check_data_config, prepared_test
from framework.errors import ConfigError
from framework.evaluation import SPEED_THREADS, evaluate_loss, model_metrics, perplexity
from framework.runtimes import open_runtime


def evaluate(cfg: DictConfig) -> dict:
    """Measure the artifact `cfg.input` (results in cfg.run_dir/evaluation.json, never in the input), or,
    given a pipeline's run directory, rebuild its report from its stages' artifacts.

    With `data.test_paths`, the loss is over every token of those files (test_loss, test_ppl, test_tokens);
    otherwise over the val split of `data`.
    """
    source = cfg.get("input")
    if not source:
        raise ConfigError("input", "name an artifact (a stage's directory) or a pipeline run directory: input=<dir>")
    if os.path.isdir(source) and not artifacts.is_complete(source) and report.stage_dirs(source):
        return {"rows": report.rebuild(source)}
    artifacts.check_artifact(source, "input")
    typed = to_schema(OmegaConf.create({k: cfg[k] for k in StageConfig.__dataclass_fields__ if k in cfg}), StageConfig)
    data = typed.data
    check_data_config(data, needs_corpus=not data.test_paths)
    from transformers import AutoTokenizer

    model_dir = os.path.join(source, artifacts.MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # In the runtime the artifact's format targets; parameters as the stage counted them (an ONNX or GGUF
    # runtime does not expose them), unless there is a torch model to count.
    runtime = open_runtime(model_dir, SPEED_THREADS)
    stored = artifacts.read_metrics(source)
    metrics = {k: stored[k] for k in ("params_total", "params_nonzero", "sparsity") if k in stored}
    if data.test_paths:
        tokens = prepared_test(data, tokenizer, typed.paths.cache_dir).tokens("test")
        if len(tokens) < 2:
            raise ConfigError("data.test_paths", f"the test files hold {len(tokens)} token(s): nothing to score")
        loss = whole_stream_loss(runtime, tokens, data.block_size, data.batch_size)
        prompt = torch.from_numpy(tokens[: data.block_size].astype(np.int64))[None]
        on_prompt = model_metrics(runtime, prompt, data.batch_size, tokenizer)
        metrics.update({k: v for k, v in on_prompt.items() if k not in ("val_loss", "val_ppl", "eval_blocks", "eval_block_tokens")})
        metrics.update(test_loss=loss, test_ppl=perplexity(loss), test_tokens=len(tokens), test_paths=list(data.test_paths))
    else:
        datamodule = LMDataModule(data, tokenizer, typed.paths.cache_dir, typed.seed)
        metrics.update(model_metrics(runtime, datamodule.val_blocks(), data.batch_size, tokenizer))
        metrics.update(data=data.name)
    metrics.update(size_bytes=artifacts.directory_size(model_dir))
    artifacts.atomic_write_json(os.path.join(typed.run_dir, "evaluation.json"), metrics)
    report.print_table([report.row(os.path.basename(os.path.normpath(source)), "evaluate", source, metrics, False, 0.0)], "evaluation")
    if data.test_paths:
        print(f"test ppl {metrics['test_ppl']:.2f} (loss {loss:.4f}) over {len(tokens):,} tokens of {', '.join(data.test_paths)}")
    return metrics


def whole_stream_loss(runtime, tokens: np.ndarray, block_size: int, batch_size: int) -> float:
    """Mean next-token loss over a whole token stream, read a batch at a time: consecutive blocks of
    `block_size`, the last one shorter; every token is predicted but the first of each block."""
    total, predicted = 0.0, 0
    for start in range(0, len(tokens), block_size * batch_size):
        chunk = torch.from_numpy(tokens[start : start + block_size * batch_size].astype(np.int64))
        full = len(chunk) // block_size * block_size
        for blocks in (chunk[:full].view(-1, block_size), chunk[full:][None]):
            count = blocks[:, 1:].numel()
            if count:
                total += evaluate_loss(runtime, blocks, batch_size) * count
                predicted += count
    return total / predicted
