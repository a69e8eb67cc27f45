"""Benchmark tables: the framework's stages measured against plain baselines, written to outputs/bench/.

A table is a function that measures and returns rows, plus `write_table`, which writes
outputs/bench/<name>.json (rows, caption, machine) and <name>.md. The train table times the train loop;
the pruning, quantization and distillation tables run the framework's own stages (`framework.stages`)
on one dense artifact and compare each result with a reference row, side by side in one run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from framework import artifacts
from framework.artifacts import atomic_write_json, atomic_write_text
from framework.compression import pruning
from framework.config import validate_train_config  # also registers the resolvers and schema compose needs
from framework.data import ResumableBatchSampler, corpus_id, load_documents, packed_splits
from framework.evaluation import evaluate_loss, measure_latency, perplexity
from framework.models import build_model_and_tokenizer, load_model_dir
from framework.modules import lr_lambda
from framework.stages import STAGES
from framework.training import StageHooks, save_hf, train

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
    """Floats from 10 up as whole numbers (rates), smaller ones to 3 significant digits (ratios, losses).

    None is a cell that does not apply (the reference row has no stage to time).
    """
    if value is None:
        return "—"
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
    """Write <out_dir>/<name>.json and <name>.md (each atomically); returns the Markdown.

    The JSON holds the columns as [key, header] pairs: it is written with sorted keys, which would lose their order.
    """
    markdown = markdown_table(rows, columns, caption)
    record = {
        "name": name, "caption": caption, "columns": [[key, header] for key, header in columns.items()],
        "rows": list(rows), "machine": machine_info(), **(meta or {}),
    }
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), record)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), markdown)
    return markdown


# --- train throughput: the framework's train stage against a plain PyTorch loop ------------------------------


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    """The train config as `recipes/train.py` composes it from conf/, with Hydra overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


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
                cfg = compose_train_config([*timed_run_overrides(model, precision, warmup + timed, run_dir), *overrides])
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
    from framework.launch import run_stage
    from framework.training import extra_callbacks

    warmup, timed = steps
    rows = []
    for count in processes:
        with tempfile.TemporaryDirectory(prefix="bench-") as run_dir:
            distributed = ["strategy=ddp", f"trainer.devices={count}"] if count > 1 else []
            cfg = compose_train_config([
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
        f"Machine: {describe_machine(machine_info())}."
    )
    meta = {"steps": {"warmup": steps[0], "timed": steps[1]}, "overrides": list(overrides), "load_avg_1m_before": load_before}
    return write_table("scaling", rows, SCALING_COLUMNS, caption, meta, out_dir)


# --- compression tables: the framework's stages on one dense artifact ----------------------------------------


@dataclass(frozen=True)
class BenchSize:
    """How big the compression tables are; `QUICK_SIZE` shrinks them to a smoke run."""

    model: str = "smollm2_135m"
    val_blocks: int = 16  # of data.block_size tokens, from the val split: every ppl is on these
    bf16_val_blocks: int = 4  # bf16 matmuls are slow on CPUs without AVX-512 BF16/AMX
    distill_steps: int = 50
    distill_batch: int = 4
    distill_lr: float = 5e-4  # as conf/pipeline/smollm2_compress.yaml; conf/distill.yaml's 3e-3 is for tiny models
    overrides: tuple[str, ...] = ()  # more Hydra overrides for every stage (tests: shorter blocks)

    @property
    def tag(self) -> str:
        """Names the run folder, so that a quick run does not overwrite the artifacts of a full one."""
        extra = hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:8] if self.overrides else ""
        return "-".join(filter(None, (self.model, f"val{self.val_blocks}", extra)))


FULL_SIZE = BenchSize()
# A smoke run: llama_tiny (not llama_nano: a derived student needs at least 2 layers, half of nano's 2 is 1),
# blocks of 32 tokens, which also shortens the calibration data.
QUICK_SIZE = BenchSize(model="llama_tiny", val_blocks=2, bf16_val_blocks=2, distill_steps=4, overrides=("data.block_size=32",))


def runs_dir(size: BenchSize, out_dir: str) -> str:
    """Where the tables' stage artifacts live; a rerun reuses every stage whose fingerprint matches."""
    return os.path.join(out_dir, "runs", size.tag)


def compose_stage_config(kind: str, size: BenchSize, run_dir: str, overrides: Sequence[str] = ()) -> DictConfig:
    """A stage config as its recipe composes it (conf/<kind>.yaml), at the bench's size."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=kind, overrides=[
            f"model={size.model}",
            f"data.max_val_blocks={size.val_blocks}",
            "trainer.enable_progress_bar=false",
            f"run_dir={run_dir}",
            *size.overrides,
            *overrides,
        ])


def run_stage(kind: str, size: BenchSize, run_dir: str, overrides: Sequence[str] = ()) -> dict:
    """Run one stage as users do (`framework.stages.STAGES`); returns its metrics.json."""
    metrics = STAGES[kind](compose_stage_config(kind, size, run_dir, overrides))
    log.info("%s %s: val ppl %.2f", kind, os.path.basename(run_dir), metrics["val_ppl"])
    return metrics


def dense_artifact(size: BenchSize, out_dir: str) -> tuple[str, dict]:
    """The reference of every table: the model as loaded (train stage, 0 steps), evaluated and saved as an artifact."""
    dense_dir = os.path.join(runs_dir(size, out_dir), "dense")
    return dense_dir, run_stage("train", size, dense_dir, ["trainer.max_steps=0"])


def dense_data(dense_dir: str, size: BenchSize) -> tuple[DictConfig, object, dict]:
    """(config, tokenizer, packed splits) of the dense artifact: the blocks its stages evaluate on."""
    from transformers import AutoTokenizer

    cfg = validate_train_config(compose_stage_config("train", size, dense_dir))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(dense_dir, artifacts.MODEL))
    return cfg, tokenizer, packed_splits(cfg.data, tokenizer, cfg.paths.cache_dir)


def data_description(dense_dir: str, size: BenchSize) -> str:
    """Model, data, block size and split sizes, for the captions."""
    cfg, _, splits = dense_data(dense_dir, size)
    val = min(size.val_blocks, len(splits["val"]))
    return (
        f"{cfg.model.name} on {cfg.data.name} (blocks of {cfg.data.block_size} tokens; calibration and training "
        f"from the train split of {len(splits['train'])} blocks; perplexity on the first {val} of "
        f"{len(splits['val'])} val blocks)"
    )


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else math.nan


# --- pruning -------------------------------------------------------------------------------------------------

# (row, prune config group, N:M pattern or None for 50% unstructured)
PRUNE_RUNS = (
    ("magnitude 50%", "magnitude", None),
    ("wanda 50%", "wanda", None),
    ("sparsegpt 50%", "sparsegpt", None),
    ("magnitude 2:4", "magnitude", (2, 4)),
    ("wanda 2:4", "wanda", (2, 4)),
    ("sparsegpt 2:4", "sparsegpt", (2, 4)),
)

PRUNING_COLUMNS = {
    "run": "method",
    "sparsity": "sparsity reached (prunable weights)",
    "val_ppl": "val ppl",
    "vs_dense": "ppl ratio to dense",
    "wall_time_s": "stage wall time (s)",
}


def pruning_rows(size: BenchSize, out_dir: str, dense_dir: str, dense: dict, runs: Sequence[tuple] = PRUNE_RUNS) -> list[dict]:
    """Dense, then each method one-shot (no recovery finetune) at 50% and at 2:4, from the same dense artifact."""
    # The dense row's sparsity over the same prunable layers as the prune stages report (a GGUF's
    # dequantized weights hold a few exact zeros).
    dense_sparsity = pruning.sparsity_report(load_model_dir(os.path.join(dense_dir, artifacts.MODEL)))["sparsity"]
    rows = [{"run": "dense", "sparsity": dense_sparsity, "val_ppl": dense["val_ppl"], "wall_time_s": None}]
    for label, method, n_m in runs:
        name = f"prune-{method}-" + (f"{n_m[0]}of{n_m[1]}" if n_m else "50")
        pattern = [f"prune.n_m=[{n_m[0]},{n_m[1]}]"] if n_m else ["prune.sparsity=0.5"]
        metrics = run_stage("prune", size, os.path.join(runs_dir(size, out_dir), name),
                            [f"input={dense_dir}", f"prune={method}", *pattern, "trainer.max_steps=0"])
        rows.append({
            "run": label,
            "sparsity": metrics["prunable_sparsity"],
            "val_ppl": metrics["val_ppl"],
            "wall_time_s": metrics["wall_time_s"],
            "n_m_ok": metrics.get("n_m_ok"),
            "val_ppl_start": metrics["val_ppl_start"],  # the dense model as this stage saw it: equals the dense row
        })
    for row in rows:
        row["vs_dense"] = ratio(row["val_ppl"], dense["val_ppl"])
    return rows


def pruning_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR, runs: Sequence[tuple] = PRUNE_RUNS) -> str:
    """Measure the pruning table and write <out_dir>/pruning.json and .md; returns the Markdown.

    `runs`: a subset of PRUNE_RUNS (the tests run two, to stay fast).
    """
    load_before = warn_if_busy()
    dense_dir, dense = dense_artifact(size, out_dir)
    rows = pruning_rows(size, out_dir, dense_dir, dense, runs)
    caption = (
        f"One-shot pruning (no recovery finetune) of {data_description(dense_dir, size)}, each method run as the "
        f"framework's prune stage on the same dense artifact. Sparsity is over the prunable linear layers "
        f"(embeddings and norms stay dense); stage wall time covers loading, evaluating the input, pruning "
        f"(calibration: conf/prune defaults), evaluating, latency and saving, timed when the stage last ran. "
        f"Machine: {describe_machine(machine_info())}."
    )
    return write_table("pruning", rows, PRUNING_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)


# --- structure: fewer parameters, lower latency ----------------------------------------------------------------

# (row, stage kind, overrides): structured pruning removes whole KV groups, MLP channels and layers;
# low-rank replaces MLP matrices by two thinner ones. Both change the shapes, so both should run faster.
STRUCTURE_RUNS = (
    ("structured (1/3 heads, 1/4 MLP)", "prune", ["prune=structured", "prune.heads_ratio=0.34", "prune.mlp_ratio=0.25"]),
    ("structured (+ 1/5 of layers)", "prune", ["prune=structured", "prune.heads_ratio=0.34", "prune.mlp_ratio=0.25", "prune.drop_layers=6"]),
    ("low-rank MLP (rank 128)", "lowrank", ["lowrank.energy=null", "lowrank.rank=128"]),
)

STRUCTURE_COLUMNS = {
    "run": "model",
    "params": "parameters",
    "params_ratio": "params ratio to dense",
    "latency_ms_per_token": "latency (ms/token)",
    "latency_ratio": "latency ratio to dense",
    "val_ppl": "val ppl (no recovery)",
}


def structure_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR, runs: Sequence[tuple] = STRUCTURE_RUNS) -> str:
    """Structured pruning and low-rank factorization against the dense model: size and CPU latency."""
    load_before = warn_if_busy()
    dense_dir, dense = dense_artifact(size, out_dir)
    rows = [{"run": "dense", "params": dense["params_total"], "latency_ms_per_token": dense["latency_ms_per_token"], "val_ppl": dense["val_ppl"]}]
    for label, kind, overrides in runs:
        name = f"{kind}-" + "-".join(o.split("=")[-1] for o in overrides)
        metrics = run_stage(kind, size, os.path.join(runs_dir(size, out_dir), name), [f"input={dense_dir}", *overrides, "trainer.max_steps=0"])
        rows.append({"run": label, "params": metrics["params_total"], "latency_ms_per_token": metrics["latency_ms_per_token"], "val_ppl": metrics["val_ppl"]})
    for row in rows:
        row["params_ratio"] = ratio(row["params"], dense["params_total"])
        row["latency_ratio"] = ratio(row["latency_ms_per_token"], dense["latency_ms_per_token"])
    caption = (
        f"Structured pruning and low-rank factorization of {data_description(dense_dir, size)}, one-shot (no "
        f"recovery finetune, so perplexity is what a recovery finetune starts from). Latency: greedy generation "
        f"of 8 tokens after a one-block prompt, fp32, measured by each stage. Machine: {describe_machine(machine_info())}."
    )
    return write_table("structure", rows, STRUCTURE_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)


# --- quantization ----------------------------------------------------------------------------------------------

QUANT_METHODS = (("int8 weight-only", "int8_weight_only"), ("int8 dynamic", "int8_dynamic"))

QUANTIZATION_COLUMNS = {
    "run": "precision",
    "size_mb": "size on disk (MB)",
    "size_ratio": "size ratio to fp32",
    "val_blocks": "val blocks",
    "val_ppl": "val ppl",
    "ppl_ratio": "ppl ratio to fp32 (same blocks)",
    "latency_ms_per_token": "latency (ms/token)",
    "latency_ratio": "latency ratio to fp32",
    "wall_time_s": "stage wall time (s)",
}


def measure_bf16(dense_dir: str, tokenizer, blocks: torch.Tensor, batch_size: int) -> dict:
    """The dense model cast to bfloat16, measured as the stages measure (there is no bf16 quantize method).

    bf16 runs on fewer val blocks than the other rows (slow matmuls without AVX-512 BF16), so the fp32
    model is evaluated on the same `blocks` too, for a fair ratio.
    """
    model = load_model_dir(os.path.join(dense_dir, artifacts.MODEL))
    fp32_loss = evaluate_loss(model, blocks, batch_size)
    started = time.perf_counter()
    model = model.to(torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as directory:
        save_hf(model, tokenizer, directory)  # model + tokenizer, as an artifact's model/ dir
        size_bytes = artifacts.directory_size(directory)
    loss = evaluate_loss(model, blocks, batch_size)
    # The same prompt (the first val block) and new tokens as the stages' latency, one repeat instead of two.
    latency = measure_latency(model, blocks[:1], repeats=1)
    return {
        "size_bytes": size_bytes,
        "val_blocks": len(blocks),
        "val_ppl": perplexity(loss),
        "fp32_val_ppl_same_blocks": perplexity(fp32_loss),
        "latency_ms_per_token": latency["latency_ms_per_token"],
        "wall_time_s": time.perf_counter() - started,
    }


def quantization_rows(size: BenchSize, out_dir: str, dense_dir: str, dense: dict, methods: Sequence[tuple] = QUANT_METHODS) -> list[dict]:
    """fp32 (the dense artifact), bf16 (a cast), and each int8 method as the framework's quantize stage (PTQ)."""
    cfg, tokenizer, splits = dense_data(dense_dir, size)
    val_blocks = min(size.val_blocks, len(splits["val"]))
    fp32 = {"run": "fp32", "size_bytes": dense["size_bytes"], "val_blocks": val_blocks, "val_ppl": dense["val_ppl"],
            "latency_ms_per_token": dense["latency_ms_per_token"], "wall_time_s": None}
    bf16 = {"run": "bf16", **measure_bf16(dense_dir, tokenizer, splits["val"][: min(val_blocks, size.bf16_val_blocks)], cfg.data.batch_size)}
    rows = [fp32, bf16]
    for label, method in methods:
        metrics = run_stage("quantize", size, os.path.join(runs_dir(size, out_dir), f"quantize-{method}"),
                            [f"input={dense_dir}", f"quantize={method}", "trainer.max_steps=0"])
        rows.append({"run": label, "size_bytes": metrics["size_bytes"], "val_blocks": val_blocks, "val_ppl": metrics["val_ppl"],
                     "latency_ms_per_token": metrics["latency_ms_per_token"], "wall_time_s": metrics["wall_time_s"]})
    for row in rows:
        row["size_mb"] = row["size_bytes"] / 1e6
        row["size_ratio"] = ratio(row["size_bytes"], fp32["size_bytes"])
        row["ppl_ratio"] = ratio(row["val_ppl"], row.get("fp32_val_ppl_same_blocks", fp32["val_ppl"]))
        row["latency_ratio"] = ratio(row["latency_ms_per_token"], fp32["latency_ms_per_token"])
    return rows


def quantization_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR, methods: Sequence[tuple] = QUANT_METHODS) -> str:
    """Measure the quantization table and write <out_dir>/quantization.json and .md; returns the Markdown.

    `methods`: a subset of QUANT_METHODS (the tests run one, to stay fast).
    """
    load_before = warn_if_busy()
    dense_dir, dense = dense_artifact(size, out_dir)
    rows = quantization_rows(size, out_dir, dense_dir, dense, methods)
    bf16 = "with" if machine_info()["avx512_bf16"] or machine_info()["amx_bf16"] else "without"
    caption = (
        f"Post-training quantization of {data_description(dense_dir, size)}. int8 rows: the framework's quantize "
        f"stage (torchao; decoder linears and embeddings) on the fp32 dense artifact. bf16: the dense model cast "
        f"to bfloat16 and measured with the same functions, on its first {rows[1]['val_blocks']} val blocks only "
        f"(bf16 matmuls are slow on this CPU, {bf16} AVX-512 BF16/AMX), its ppl ratio against fp32 on those blocks, "
        f"its latency from one generation instead of two, its wall time that of the cast, save and measurement. "
        f"Size: the model/ directory with the tokenizer. Latency: greedy generation of 8 tokens after a "
        f"one-block prompt (the first val block), per new token, prompt processing included. "
        f"Machine: {describe_machine(machine_info())}."
    )
    return write_table("quantization", rows, QUANTIZATION_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)


# --- distillation ------------------------------------------------------------------------------------------------

DISTILLATION_COLUMNS = {
    "run": "model",
    "params_m": "params (M)",
    "val_ppl": "val ppl",
    "vs_teacher": "ppl ratio to teacher",
    "train_tokens_per_s": "train tokens/s",
    "wall_time_s": "stage wall time (s)",
}


def distillation_rows(size: BenchSize, out_dir: str, dense_dir: str, teacher: dict) -> list[dict]:
    """Teacher (the dense model), a half-depth student trained with it (KD) and the same student trained alone."""
    steps = size.distill_steps
    distill_dir = os.path.join(runs_dir(size, out_dir), f"distill-{steps}steps")
    kd = run_stage("distill", size, distill_dir, [
        f"distill.teacher={dense_dir}",
        "distill.layer_ratio=0.5",
        "distill.baseline=true",
        f"trainer.max_steps={steps}",
        # No validation or step checkpoints inside the run: the stage evaluates at its end.
        f"trainer.val_check_interval={steps + 1}",
        f"trainer.checkpoint_every_n_steps={steps + 1}",
        f"data.batch_size={size.distill_batch}",
        f"optimizer.lr={size.distill_lr}",
    ])
    alone = artifacts.read_metrics(os.path.join(distill_dir, "baseline"))  # the baseline's own artifact
    rows = [{"run": "teacher (dense)", "params": teacher["params_total"], "val_ppl": teacher["val_ppl"], "train_tokens_per_s": None, "wall_time_s": None}]
    for label, metrics in (("student, KD from teacher", kd), ("student, no teacher", alone)):
        rows.append({"run": label, "params": metrics["params_total"], "val_ppl": metrics["val_ppl"],
                     "train_tokens_per_s": metrics["train_tokens_per_s"], "wall_time_s": metrics["wall_time_s"],
                     "train_steps": metrics["train_steps"]})
    for row in rows:
        row["params_m"] = row["params"] / 1e6
        row["vs_teacher"] = ratio(row["val_ppl"], teacher["val_ppl"])
    return rows


def distillation_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR) -> str:
    """Measure the distillation table and write <out_dir>/distillation.json and .md; returns the Markdown."""
    load_before = warn_if_busy()
    dense_dir, dense = dense_artifact(size, out_dir)
    rows = distillation_rows(size, out_dir, dense_dir, dense)
    cfg = compose_stage_config("distill", size, "unused", [f"distill.teacher={dense_dir}"])  # for the caption only
    caption = (
        f"Distillation of {data_description(dense_dir, size)}: the teacher is the dense model, not finetuned; the "
        f"student keeps half its layers (distill.layer_ratio=0.5, weights copied from the teacher). Both students "
        f"train {size.distill_steps} steps of batch {size.distill_batch} (AdamW, lr {size.distill_lr:g}, "
        f"{cfg.scheduler.name} schedule), one with {cfg.distill.loss} KD (T={cfg.distill.temperature:g}, "
        f"alpha={cfg.distill.alpha:g}) from the teacher, one on the labels alone (distill.baseline). Train tokens/s "
        f"over all steps (KD includes the teacher's forward); wall time per stage, as it last ran. "
        f"Machine: {describe_machine(machine_info())}."
    )
    return write_table("distillation", rows, DISTILLATION_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)
