"""Benchmark tables: the framework's stages measured against plain baselines, written to outputs/bench/.

A table is a function that measures and returns rows, plus `write_table`, which writes
outputs/bench/<name>.json (rows, caption, machine) and <name>.md. Later tables (pruning, quantization,
distillation) are more functions of the same shape.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from typing import Sequence

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from framework.artifacts import atomic_write_json, atomic_write_text
from framework.config import validate_train_config  # also registers the resolvers and schema compose needs
from framework.data import ResumableBatchSampler, corpus_id, load_documents, packed_splits
from framework.models import build_model_and_tokenizer
from framework.modules import lr_lambda
from framework.training import StageHooks, train

log = logging.getLogger(__name__)

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
BENCH_DIR = os.path.join("outputs", "bench")

# (warm-up steps, timed steps) per precision. bf16 is ~30x slower than fp32 on CPUs without
# AVX-512 BF16/AMX, so it gets fewer steps to keep the whole bench within a few minutes.
TRAIN_STEPS = {"32-true": (5, 30), "bf16-mixed": (2, 8)}
QUICK_TRAIN_STEPS = {"32-true": (2, 5), "bf16-mixed": (1, 2)}


# --- the machine ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, torch version and the CPU features that decide whether bf16 is fast."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return {
        "cpu": model or "unknown",
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def describe_machine(machine: dict) -> str:
    bf16 = "with" if machine["avx512_bf16"] or machine["amx_bf16"] else "without"
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores ({bf16} AVX-512 BF16/AMX)"
    return f"{where}, torch {machine['torch']}"


def warn_if_busy() -> float:
    """The 1-minute load average; a warning when other jobs use the CPU, which makes every timing low and noisy.

    Mostly worse for the fp32 runs: torch's threads wait on the busy cores (seen: 20x slower).
    """
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.1f on %d cores: other jobs are using the CPU, timings will be off", load, os.cpu_count())
    return load


# --- tables --------------------------------------------------------------------------------------------------


def format_value(value) -> str:
    """Floats from 10 up as whole numbers (rates), smaller ones to 3 significant digits (ratios, losses)."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if abs(value) >= 10 else f"{value:#.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: dict[str, str], caption: str) -> str:
    """`columns` maps row keys to headers, in display order."""
    lines = [
        "| " + " | ".join(columns.values()) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
        *("| " + " | ".join(format_value(row[key]) for key in columns) + " |" for row in rows),
    ]
    return "\n".join(lines) + f"\n\n{caption}\n"


def write_table(name: str, rows: Sequence[dict], columns: dict[str, str], caption: str, meta: dict | None = None, out_dir: str = BENCH_DIR) -> str:
    """Write <out_dir>/<name>.json and <name>.md (each atomically); returns the Markdown."""
    markdown = markdown_table(rows, columns, caption)
    record = {"name": name, "caption": caption, "columns": columns, "rows": list(rows), "machine": machine_info(), **(meta or {})}
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), record)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), markdown)
    return markdown


# --- train throughput: the framework's train stage against a plain PyTorch loop ------------------------------


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    """The train config as `recipes/train.py` composes it from conf/, with Hydra overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def window_tokens_per_s(step_ends: Sequence[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s from the end of step `warmup` to the end of the last step (the warm-up steps are not timed)."""
    if not 1 <= warmup < len(step_ends):
        raise ValueError(f"need at least one warm-up and one timed step, got warm-up {warmup} of {len(step_ends)} steps")
    timed = len(step_ends) - warmup
    return timed * tokens_per_step / (step_ends[-1] - step_ends[warmup - 1])


class StepEnds(pl.Callback):
    """The time at which each training step ends (after the optimizer step), for `window_tokens_per_s`."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())


def run_framework(cfg: DictConfig, warmup: int) -> dict:
    """The framework's train stage, as `recipes/train.py` runs it, timed over the steps after the warm-up."""
    cfg = validate_train_config(cfg)
    step_ends = StepEnds()
    metrics = train(cfg, hooks=StageHooks(callbacks=[step_ends]))
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    return {"tokens_per_s": window_tokens_per_s(step_ends.times, warmup, tokens_per_step), "loss": metrics["train_loss"], "steps": len(step_ends.times)}


def run_plain_loop(cfg: DictConfig, warmup: int) -> dict:
    """A plain PyTorch loop over the framework's model, data, batch order, optimizer, schedule and clipping.

    Built with the framework's own builders so that only the loop differs; with the same seed its
    fp32 losses match the framework's, which shows the two do the same work.
    """
    cfg = validate_train_config(cfg)
    if cfg.precision.name not in ("32-true", "bf16-mixed") or cfg.optimizer.name != "adamw":
        raise ValueError("the plain loop does AdamW in 32-true or bf16-mixed only")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    documents = load_documents(cfg.data)
    model, tokenizer = build_model_and_tokenizer(
        cfg.model, cfg.paths.cache_dir, corpus=(lambda: (text for _, text in documents), corpus_id(cfg.data))
    )
    blocks = packed_splits(cfg.data, tokenizer, cfg.paths.cache_dir, documents)["train"]
    batches = ResumableBatchSampler(len(blocks), cfg.data.batch_size, cfg.seed)

    params = list(model.parameters())
    opt = cfg.optimizer
    groups = [  # as the framework's: no weight decay on biases and norm weights
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.trainer.max_steps))
    clip = cfg.trainer.gradient_clip_val

    model.train()
    step_ends = []
    for _, indices in zip(range(cfg.trainer.max_steps), batches):
        input_ids = blocks[indices]
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
                cfg = compose_train_config([
                    f"model={model}",
                    f"precision={precision}",
                    f"trainer.max_steps={warmup + timed}",
                    "trainer.enable_progress_bar=false",
                    # Neither validation nor checkpoints inside the timed window: the plain loop has none.
                    f"trainer.val_check_interval={warmup + timed + 1}",
                    f"trainer.checkpoint_every_n_steps={warmup + timed + 1}",
                    "data.max_val_blocks=8",
                    f"run_dir={run_dir}",
                    *overrides,
                ])
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
    cfg = validate_train_config(compose_train_config([f"model={model}", "run_dir=unused", *overrides]))
    data, opt = cfg.data, cfg.optimizer
    counts = "; ".join(f"{p}: {timed} timed steps after {warmup} warm-up" for p, (warmup, timed) in steps.items())
    caption = (
        f"Train throughput: the framework's train stage against a plain PyTorch loop, same model "
        f"({cfg.model.name}), data ({data.name}, block {data.block_size}, batch {data.batch_size}), "
        f"steps, AdamW (lr {opt.lr:g}) and precision; equal last-step losses show that both loops do the same "
        f"computation. Tokens/s over the timed steps only ({counts}). "
        f"Machine: {describe_machine(machine_info())}."
    )
    meta = {
        "steps": {p: {"warmup": w, "timed": t} for p, (w, t) in steps.items()},
        "overrides": list(overrides),
        "load_avg_1m_before": load_before,
    }
    return write_table("train", rows, TRAIN_COLUMNS, caption, meta, out_dir)
