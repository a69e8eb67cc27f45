"""Train-loop tables: the framework against a plain PyTorch loop, and data-parallel scaling."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Sequence

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from bench.common import BENCH_DIR, StepEnds, warn_if_busy, window_tokens_per_s, write_table
from framework.compose import compose
from framework.data import LMDataModule, ResumableBatchSampler, training_texts
from framework.hardware import describe_machine
from framework.launch import run_stage
from framework.models import build_model_and_tokenizer
from framework.stages import STAGES
from framework.training import extra_callbacks
from framework.training.modules import build_optimizer, lr_lambda

log = logging.getLogger(__name__)

# (warm-up steps, timed steps) per precision. bf16 is ~30x slower than fp32 on CPUs without
# AVX-512 BF16/AMX, so it gets fewer steps to keep the whole bench within a few minutes.
TRAIN_STEPS = {"32-true": (5, 30), "bf16-mixed": (2, 8)}
QUICK_TRAIN_STEPS = {"32-true": (2, 5), "bf16-mixed": (1, 2)}


def train_config(overrides: Sequence[str]) -> DictConfig:
    """The validated train config, as `recipes/train.py` composes and checks it."""
    return STAGES["train"].validate(compose("train", overrides))


def timed_run_overrides(model: str, precision: str, total_steps: int, run_dir: str) -> list[str]:
    """A short train run to time: neither validation nor checkpoints inside it (a plain loop has none)."""
    return [
        f"model={model}",
        f"precision={precision}",
        f"trainer.max_steps={total_steps}",
        "trainer.enable_progress_bar=false",
        f"trainer.val_check_interval={total_steps + 1}",
        f"trainer.checkpoint_every_n_steps={total_steps + 1}",
        "data.max_val_blocks=8",
        f"run_dir={run_dir}",
    ]


def run_framework(cfg: DictConfig, warmup: int) -> dict:
    """The framework's train stage, as `recipes/train.py` runs it, timed over the steps after the warm-up."""
    step_ends = StepEnds()
    with extra_callbacks([step_ends]):
        metrics = STAGES["train"].run(cfg)
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    return {"tokens_per_s": window_tokens_per_s(step_ends.times, warmup, tokens_per_step), "loss": metrics["train_loss"], "steps": len(step_ends.times)}


def run_plain_loop(cfg: DictConfig, warmup: int) -> dict:
    """A plain PyTorch loop over the framework's model, data, batch order, optimizer, schedule and clipping.

    Built with the framework's own builders so that only the loop differs; with the same seed its
    fp32 losses match the framework's, which shows the two do the same work.
    """
    if cfg.precision.name not in ("32-true", "bf16-mixed") or cfg.optimizer.name != "adamw":
        raise ValueError("the plain loop does AdamW in 32-true or bf16-mixed only")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, corpus=training_texts(cfg.data))
    blocks = LMDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.seed).train_set
    batches = ResumableBatchSampler(len(blocks), cfg.data.batch_size, cfg.seed)

    params = list(model.parameters())
    optimizer = build_optimizer(params, cfg.optimizer)  # the framework's parameter groups and optimizer
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.trainer.max_steps))
    clip = cfg.trainer.gradient_clip_val

    model.train()
    step_ends = []
    for _, indices in zip(range(cfg.trainer.max_steps), batches):
        input_ids = blocks.stack(indices)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.name == "bf16-mixed"):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_ends.append(time.perf_counter())
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    return {"tokens_per_s": window_tokens_per_s(step_ends, warmup, tokens_per_step), "loss": loss.item(), "steps": len(step_ends)}


TRAIN_COLUMNS = {
    "run": "loop / precision",
    "tokens_per_s": "tokens/s",
    "vs_plain": "ratio to plain loop (same precision)",
    "vs_fp32": "ratio to 32-true (same loop)",
    "loss": "train loss, last step",
}


def train_throughput(steps: dict[str, tuple[int, int]] = TRAIN_STEPS, model: str = "llama_tiny", overrides: Sequence[str] = ()) -> list[dict]:
    """Rows of the train table: framework and plain loop at each precision in `steps` (32-true first).

    `steps` maps a precision to (warm-up, timed) steps; `overrides` are more Hydra overrides of the
    train config (its data default is stdlib_docs, block 128, batch 8).
    """
    rows = []
    for precision, (warmup, timed) in steps.items():
        for loop, run in (("framework", run_framework), ("plain loop", run_plain_loop)):
            with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
                cfg = train_config([*timed_run_overrides(model, precision, warmup + timed, run_dir), *overrides])
                result = run(cfg, warmup)
            log.info("%s / %s: %.0f tokens/s", loop, precision, result["tokens_per_s"])
            rows.append({"run": f"{loop} / {precision}", "loop": loop, "precision": precision, "warmup_steps": warmup, **result})
    fp32 = {row["loop"]: row["tokens_per_s"] for row in rows if row["precision"] == "32-true"}
    plain = {row["precision"]: row["tokens_per_s"] for row in rows if row["loop"] == "plain loop"}
    for row in rows:
        row["vs_plain"] = row["tokens_per_s"] / plain[row["precision"]]
        row["vs_fp32"] = row["tokens_per_s"] / fp32[row["loop"]] if row["loop"] in fp32 else math.nan
    return rows


def train_table(steps: dict[str, tuple[int, int]] = TRAIN_STEPS, model: str = "llama_tiny", overrides: Sequence[str] = (), out_dir: str = BENCH_DIR) -> str:
    """Measure the train table and write it as <out_dir>/train.json and train.md; returns the Markdown."""
    load_before = warn_if_busy()
    rows = train_throughput(steps, model, overrides)
    cfg = train_config([f"model={model}", "run_dir=unused", *overrides])
    data, opt = cfg.data, cfg.optimizer
    counts = "; ".join(f"{p}: {timed} timed steps after {warmup} warm-up" for p, (warmup, timed) in steps.items())
    caption = (
        f"Train throughput: the framework's train stage against a plain PyTorch loop, same model "
        f"({cfg.model.name}), data ({data.name}, block {data.block_size}, batch {data.batch_size}), "
        f"steps, AdamW (lr {opt.lr:g}) and precision; equal last-step losses show that both loops do the same "
        f"computation. Tokens/s over the timed steps only ({counts}). "
        f"Machine: {describe_machine()}."
    )
    meta = {
        "steps": {p: {"warmup": w, "timed": t} for p, (w, t) in steps.items()},
        "overrides": list(overrides),
        "load_avg_1m_before": load_before,
    }
    return write_table("train", rows, TRAIN_COLUMNS, caption, meta, out_dir)


# --- data-parallel scaling: one process against DDP ranks at the same global batch --------------------------

SCALING_STEPS = (5, 30)  # (warm-up, timed)
SCALING_COLUMNS = {
    "processes": "processes",
    "batch_per_process": "batch per process",
    "tokens_per_s": "tokens/s (global)",
    "vs_one_process": "ratio to 1 process",
    "loss": "train loss, last step",
}


def scaling_rows(processes: Sequence[int] = (1, 2), global_batch: int = 16, steps: tuple[int, int] = SCALING_STEPS, model: str = "llama_tiny", overrides: Sequence[str] = ()) -> list[dict]:
    """The train recipe's path (framework.launch.run_stage) on 1 and on N DDP processes, global batch fixed."""
    warmup, timed = steps
    rows = []
    for count in processes:
        with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
            distributed = ["strategy=ddp", f"trainer.devices={count}"] if count > 1 else []
            cfg = train_config([
                *timed_run_overrides(model, "32-true", warmup + timed, run_dir), f"data.batch_size={global_batch // count}", *distributed, *overrides,
            ])
            step_ends = StepEnds()  # on rank 0, which waits for every rank at each gradient all-reduce
            with extra_callbacks([step_ends]):
                metrics = run_stage("train", cfg)
        tokens_per_step = global_batch * cfg.data.block_size
        row = {"processes": count, "batch_per_process": global_batch // count, "tokens_per_s": window_tokens_per_s(step_ends.times, warmup, tokens_per_step), "loss": metrics["train_loss"]}
        log.info("%d process(es): %.0f tokens/s", count, row["tokens_per_s"])
        rows.append(row)
    for row in rows:
        row["vs_one_process"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def scaling_table(processes: Sequence[int] = (1, 2), global_batch: int = 16, steps: tuple[int, int] = SCALING_STEPS, model: str = "llama_tiny", overrides: Sequence[str] = (), out_dir: str = BENCH_DIR) -> str:
    """Measure the scaling table and write it as <out_dir>/scaling.json and scaling.md; returns the Markdown."""
    load_before = warn_if_busy()
    rows = scaling_rows(processes, global_batch, steps, model, overrides)
    caption = (
        f"Data-parallel scaling: the train recipe on 1 process and on DDP processes (gloo on the CPU, each "
        f"process given cores / processes threads), {model}, global batch {global_batch}, 32-true; tokens/s "
        f"over {steps[1]} timed steps after {steps[0]} warm-up. Equal losses: every run trains on the same data "
        f"in the same order. On a CPU the processes share the same cores, so this measures the cost of the "
        f"gradient all-reduce rather than a speed-up; on GPUs each process has its own device. "
        f"Machine: {describe_machine()}."
    )
    meta = {"steps": {"warmup": steps[0], "timed": steps[1]}, "overrides": list(overrides), "load_avg_1m_before": load_before}
    return write_table("scaling", rows, SCALING_COLUMNS, caption, meta, out_dir)
