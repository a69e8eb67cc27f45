"""The classification table: the models of experiment=classify_compress side by side in one run.

Rows: the teacher (all-MiniLM-L6-v2 finetuned on stdlib_topics), the structurally pruned teacher, the 3-layer
student distilled from the teacher, the same student trained without it (distill.baseline), and the student in
int8 (the quantize stage: onnxruntime on a CPU). Columns: val accuracy and macro-F1 (from each stage's
metrics.json, all on the same val split), parameters, size on disk of what the runtime loads (the int8 row: its
ONNX files), and latency per example at batch 1, each as a ratio to the teacher. Latency is measured here,
interleaved: every round times every model once over the same val examples (one thread each,
framework.evaluation.latency_per_example), in a rotated order; the table reports the median over rounds and the
spread (max / min): the machine is shared and noisy.
"""

from __future__ import annotations

import glob
import logging
import os
import statistics
from typing import Sequence

from bench.common import BENCH_DIR, warn_if_busy, write_table
from framework import artifacts
from framework.compose import compose
from framework.evaluation import SPEED_THREADS, latency_per_example
from framework.hardware import describe_machine
from framework.labeled import LabeledDataModule
from framework.pipeline import plan, run_pipeline
from framework.models import load_model_dir
from framework.runtimes import OrtClassifier

log = logging.getLogger(__name__)

ROUNDS = 5
LATENCY_EXAMPLES = 24
# The preset as it is (its own steps), or shortened for --quick and the test.
QUICK = (
    "pipeline.stages.finetune.trainer.max_steps=10",
    "pipeline.stages.finetune.trainer.val_check_interval=10",
    "pipeline.stages.prune.trainer.max_steps=0",
    "+pipeline.stages.prune.prune.calibration_samples=8",
    "pipeline.stages.distill.trainer.max_steps=5",
    "pipeline.stages.distill.trainer.val_check_interval=5",
)
# (row, the model directory under the run directory)
MODELS = (
    ("teacher", "finetune"),
    ("pruned", "prune"),
    ("KD student", "distill"),
    ("no-teacher student", os.path.join("distill", "baseline")),
    ("int8 student", "quantize"),
)

CLASSIFICATION_COLUMNS = {
    "run": "model",
    "runtime": "runtime",
    "val_accuracy": "val accuracy",
    "accuracy_ratio": "accuracy / teacher",
    "val_macro_f1": "macro-F1",
    "f1_ratio": "F1 / teacher",
    "params_total": "params",
    "params_ratio": "params / teacher",
    "size_mb": "size (MB)",
    "size_ratio": "size / teacher",
    "latency_ms": "ms / example",
    "speedup": "speed / teacher",
    "latency_spread": "spread (max/min)",
}


def runtime_bytes(model_dir: str) -> int:
    """What the runtime loads: the ONNX files where there are some (a quantize stage also keeps a torchao copy)."""
    onnx = glob.glob(os.path.join(model_dir, "model.onnx*"))
    return sum(os.path.getsize(f) for f in onnx) if onnx else artifacts.directory_size(model_dir)


def interleaved_latency(models: dict, examples: list[dict], rounds: int) -> dict[str, tuple[float, float]]:
    """{row: (median ms per example over rounds, max / min)}, timing every model once per round."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # who goes first changes each round
            samples[name].append(latency_per_example(models[name], examples))
    return {name: (statistics.median(times), max(times) / min(times)) for name, times in samples.items()}


def classification_rows(quick: bool, out_dir: str, rounds: int = ROUNDS, extra: Sequence[str] = ()) -> tuple[list[dict], str]:
    run_dir = os.path.join(out_dir, "runs", "classify_compress" + ("-quick" if quick else ""))
    cfg = compose("pipeline", ["experiment=classify_compress", f"run_dir={run_dir}", "+common.trainer.enable_progress_bar=false", *(QUICK if quick else ()), *extra])
    run_pipeline(cfg)  # a finished stage is not run again
    planned = plan(cfg)
    finetune = planned[0].config
    teacher_dir = os.path.join(run_dir, "finetune", artifacts.MODEL)
    teacher = load_model_dir(teacher_dir)
    from transformers import AutoTokenizer

    data = LabeledDataModule(finetune.data, AutoTokenizer.from_pretrained(teacher_dir), finetune.seed, labels=list(teacher.config.id2label.values()))
    examples = data.val[:LATENCY_EXAMPLES]
    models, rows = {}, []
    for label, stage in MODELS:
        stage_dir = os.path.join(run_dir, stage)
        model_dir = os.path.join(stage_dir, artifacts.MODEL)
        metrics = artifacts.read_metrics(stage_dir)
        onnx = artifacts.model_format(model_dir) == "onnx"
        models[label] = OrtClassifier(model_dir, SPEED_THREADS) if onnx else (teacher if stage == "finetune" else load_model_dir(model_dir))
        rows.append({"run": label, "runtime": "onnxruntime" if onnx else "torch eager", "val_accuracy": metrics["val_accuracy"],
                     "val_macro_f1": metrics["val_macro_f1"], "params_total": metrics["params_total"], "size_mb": runtime_bytes(model_dir) / 1e6})
    latency = interleaved_latency(models, examples, rounds)
    first = rows[0]
    for row in rows:
        row["latency_ms"], row["latency_spread"] = latency[row["run"]]
        row["accuracy_ratio"] = row["val_accuracy"] / first["val_accuracy"]
        row["f1_ratio"] = row["val_macro_f1"] / first["val_macro_f1"] if first["val_macro_f1"] else float("nan")
        row["params_ratio"] = row["params_total"] / first["params_total"]
        row["size_ratio"] = row["size_mb"] / first["size_mb"]
        row["speedup"] = first["latency_ms"] / row["latency_ms"]
    steps = ", ".join(f"{stage.name} {stage.config.trainer.max_steps} steps" for stage in planned)
    description = (
        f"experiment=classify_compress ({steps}) in {run_dir}; "
        f"val: {len(data.val)} examples of {len(data.labels)} classes (always answering the training split's most frequent class: {data.majority_accuracy:.1%})"
    )
    return rows, description


def classification_table(quick: bool = False, out_dir: str = BENCH_DIR, rounds: int = ROUNDS, extra: Sequence[str] = ()) -> str:
    load_before = warn_if_busy()
    rows, description = classification_rows(quick, out_dir, rounds, extra)
    caption = (
        f"{description}. Latency: {LATENCY_EXAMPLES} val examples at batch 1, one thread, the median per example; "
        f"{rounds} interleaved rounds, their median and spread. Ratios to the teacher; size: the files the runtime "
        f"loads (int8: the ONNX graph, not the torchao copy beside it). {describe_machine()}; load average "
        f"{load_before:.1f} before."
    )
    return write_table("classification", rows, CLASSIFICATION_COLUMNS, caption, {"quick": quick, "rounds": rounds, "load_avg_1m_before": load_before}, out_dir)
