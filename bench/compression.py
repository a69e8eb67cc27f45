"""Compression tables: the framework's stages on one dense artifact, each row against a reference row,
side by side in one run. Stage artifacts are kept under outputs/bench/runs/, so a rerun reuses them."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from bench.common import BENCH_DIR, warn_if_busy, write_table
from framework import artifacts
from framework.compose import compose
from framework.compression import pruning
from framework.data import LMDataModule
from framework.evaluation import PROMPT_TOKENS, evaluate_loss, measure_speed, perplexity
from framework.hardware import describe_machine, machine_info
from framework.models import load_model_dir, save_model_dir
from framework.runtimes import TorchRuntime
from framework.stages import STAGES

log = logging.getLogger(__name__)


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
    """A stage config as its recipe composes it (conf/<kind>.yaml), at the bench's size. Only the dense
    reference picks the model; every other stage reads it from its input artifact."""
    model = [f"model={size.model}"] if kind == "train" else []
    return compose(kind, [
        *model,
        f"data.max_val_blocks={size.val_blocks}",
        "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
        *size.overrides,
        *overrides,
    ])


def measure_stage(kind: str, size: BenchSize, run_dir: str, overrides: Sequence[str] = ()) -> dict:
    """Run one stage as users do (`framework.stages.STAGES`); returns its metrics.json."""
    metrics = STAGES[kind](compose_stage_config(kind, size, run_dir, overrides))
    log.info("%s %s: val ppl %.2f", kind, os.path.basename(run_dir), metrics["val_ppl"])
    return metrics


def dense_artifact(size: BenchSize, out_dir: str) -> tuple[str, dict]:
    """The reference of every table: the model as loaded (train stage, 0 steps), evaluated and saved as an artifact."""
    dense_dir = os.path.join(runs_dir(size, out_dir), "dense")
    return dense_dir, measure_stage("train", size, dense_dir, ["trainer.max_steps=0"])


def dense_data(dense_dir: str, size: BenchSize) -> tuple[DictConfig, object, LMDataModule]:
    """(config, tokenizer, data) of the dense artifact: the blocks its stages evaluate on."""
    from transformers import AutoTokenizer

    cfg = STAGES["train"].validate(compose_stage_config("train", size, dense_dir))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(dense_dir, artifacts.MODEL))
    return cfg, tokenizer, LMDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.seed)


def data_description(dense_dir: str, size: BenchSize) -> str:
    """Model, data, block size and split sizes, for the captions."""
    cfg, _, data = dense_data(dense_dir, size)
    val = min(size.val_blocks, len(data.val_set))
    return (
        f"{cfg.model.name} on {cfg.data.name} (blocks of {cfg.data.block_size} tokens; calibration and training "
        f"from the train split of {len(data.train_set)} blocks; perplexity on the first {val} of "
        f"{len(data.val_set)} val blocks)"
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
        metrics = measure_stage("prune", size, os.path.join(runs_dir(size, out_dir), name),
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
        f"(calibration: conf/prune defaults), evaluating, speed and saving, timed when the stage last ran. "
        f"Machine: {describe_machine()}."
    )
    return write_table("pruning", rows, PRUNING_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)


# --- structure: fewer parameters, faster decoding ----------------------------------------------------------------

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
    "prefill_ms": "prefill (ms)",
    "decode_tokens_per_s_b1": "decode tokens/s (batch 1)",
    "decode_ratio": "decode speed ratio to dense",
    "val_ppl": "val ppl (no recovery)",
}


def structure_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR, runs: Sequence[tuple] = STRUCTURE_RUNS) -> str:
    """Structured pruning and low-rank factorization against the dense model: size and CPU speed."""
    load_before = warn_if_busy()
    dense_dir, dense = dense_artifact(size, out_dir)
    speed = ("prefill_ms", "decode_tokens_per_s_b1")
    rows = [{"run": "dense", "params": dense["params_total"], **{k: dense[k] for k in speed}, "val_ppl": dense["val_ppl"]}]
    for label, kind, overrides in runs:
        name = f"{kind}-" + "-".join(o.split("=")[-1] for o in overrides)
        metrics = measure_stage(kind, size, os.path.join(runs_dir(size, out_dir), name), [f"input={dense_dir}", *overrides, "trainer.max_steps=0"])
        rows.append({"run": label, "params": metrics["params_total"], **{k: metrics[k] for k in speed}, "val_ppl": metrics["val_ppl"]})
    for row in rows:
        row["params_ratio"] = ratio(row["params"], dense["params_total"])
        row["decode_ratio"] = ratio(row["decode_tokens_per_s_b1"], dense["decode_tokens_per_s_b1"])
    caption = (
        f"Structured pruning and low-rank factorization of {data_description(dense_dir, size)}, one-shot (no "
        f"recovery finetune, so perplexity is what a recovery finetune starts from). Speed: fp32 torch eager, one "
        f"thread, as each stage measures it (framework.evaluation: prefill of the first val block, decode at "
        f"batch 1, medians of repeats). Machine: {describe_machine()}."
    )
    return write_table("structure", rows, STRUCTURE_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)


# --- quantization ----------------------------------------------------------------------------------------------

# (label, quantize-stage overrides): torchao's two int8 formats, and int8 in onnxruntime (the CPU default).
QUANT_METHODS = (
    ("int8 weight-only", ("quantize=int8_weight_only", "quantize.backend=torchao")),
    ("int8 dynamic (torchao)", ("quantize=int8_dynamic", "quantize.backend=torchao")),
    ("int8 dynamic (onnxruntime)", ("quantize=int8_dynamic", "quantize.backend=onnxruntime")),
)

QUANTIZATION_COLUMNS = {
    "run": "precision",
    "size_mb": "size on disk (MB)",
    "size_ratio": "size ratio to fp32",
    "val_blocks": "val blocks",
    "val_ppl": "val ppl",
    "ppl_ratio": "ppl ratio to fp32 (same blocks)",
    "runtime": "runtime",
    "decode_tokens_per_s_b1": "decode tokens/s (batch 1)",
    "decode_ratio": "decode speed ratio to fp32",
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
        save_model_dir(model, tokenizer, directory)  # model + tokenizer, as an artifact's model/ dir
        size_bytes = artifacts.directory_size(directory)
    loss = evaluate_loss(model, blocks, batch_size)
    # The same prompt (the first val block) and new tokens as the stages' speed, one repeat.
    speed = measure_speed(TorchRuntime(model), blocks[0, :PROMPT_TOKENS], repeats=1, batch_sizes=(1,))
    return {
        "size_bytes": size_bytes,
        "val_blocks": len(blocks),
        "val_ppl": perplexity(loss),
        "fp32_val_ppl_same_blocks": perplexity(fp32_loss),
        "runtime": speed["runtime"] + " (bf16)",
        "decode_tokens_per_s_b1": speed["decode_tokens_per_s_b1"],
        "wall_time_s": time.perf_counter() - started,
    }


def quantization_rows(size: BenchSize, out_dir: str, dense_dir: str, dense: dict, methods: Sequence[tuple] = QUANT_METHODS) -> list[dict]:
    """fp32 (the dense artifact), bf16 (a cast), and each int8 method as the framework's quantize stage (PTQ)."""
    cfg, tokenizer, data = dense_data(dense_dir, size)
    val_blocks = min(size.val_blocks, len(data.val_set))
    fp32 = {"run": "fp32", "size_bytes": dense["size_bytes"], "val_blocks": val_blocks, "val_ppl": dense["val_ppl"],
            "runtime": dense["runtime"], "decode_tokens_per_s_b1": dense["decode_tokens_per_s_b1"], "wall_time_s": None}
    bf16 = {"run": "bf16", **measure_bf16(dense_dir, tokenizer, data.val_set.first(min(val_blocks, size.bf16_val_blocks)), cfg.data.batch_size)}
    rows = [fp32, bf16]
    for label, overrides in methods:
        name = "quantize-" + "-".join(o.split("=")[-1] for o in overrides)
        metrics = measure_stage("quantize", size, os.path.join(runs_dir(size, out_dir), name), [f"input={dense_dir}", *overrides, "trainer.max_steps=0"])
        rows.append({"run": label, "size_bytes": metrics["size_bytes"], "val_blocks": val_blocks, "val_ppl": metrics["val_ppl"],
                     "runtime": metrics["runtime"], "decode_tokens_per_s_b1": metrics["decode_tokens_per_s_b1"], "wall_time_s": metrics["wall_time_s"]})
    for row in rows:
        row["size_mb"] = row["size_bytes"] / 1e6
        row["size_ratio"] = ratio(row["size_bytes"], fp32["size_bytes"])
        row["ppl_ratio"] = ratio(row["val_ppl"], row.get("fp32_val_ppl_same_blocks", fp32["val_ppl"]))
        row["decode_ratio"] = ratio(row["decode_tokens_per_s_b1"], fp32["decode_tokens_per_s_b1"])
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
        f"stage on the fp32 dense artifact, torchao (decoder linears and embeddings; torch eager) or onnxruntime "
        f"(MatMulNBits int8 weights with int8 compute, the quantize stage's CPU default). bf16: the dense model cast "
        f"to bfloat16 and measured with the same functions, on its first {rows[1]['val_blocks']} val blocks only "
        f"(bf16 matmuls are slow on this CPU, {bf16} AVX-512 BF16/AMX), its ppl ratio against fp32 on those blocks, "
        f"its speed from one repeat, its wall time that of the cast, save and measurement. "
        f"Size: the model/ directory with the tokenizer. Decode: tokens/s at batch 1 after a prompt of the first "
        f"val block, one thread, median of repeats (framework.evaluation). "
        f"Machine: {describe_machine()}."
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
    kd = measure_stage("distill", size, distill_dir, [
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
        f"Machine: {describe_machine()}."
    )
    return write_table("distillation", rows, DISTILLATION_COLUMNS, caption, {"size": asdict(size), "load_avg_1m_before": load_before}, out_dir)
