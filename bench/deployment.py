"""The deployment table: one model in every format the framework writes, side by side in one run.

Rows: torch fp32 (the dense artifact), torch bf16 (a cast), GGUF F16 / Q8_0 / Q4_0 and ONNX fp32 / int8 / int4
(the export stage). Columns: size on disk, val perplexity, prefill ms and decode tokens/s at batch 1 and 8, and
each as a ratio to the bf16 torch model. Size and perplexity come from each export's metrics.json (the same val
blocks for every row). Speed is measured here, interleaved: every round times every runtime once (one repeat of
framework.evaluation.measure_speed, one thread each), in a rotated order, and the table reports the median over
rounds and the spread (max / min) of the batch-1 decode rate: the machine is shared and noisy.

A GGUF file is llama.cpp's to run; read back by transformers it is a dequantized fp32 model, whose speed is
the fp32 row's, so the GGUF rows have no speed columns.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
from dataclasses import asdict
from typing import Sequence

import torch

from bench.common import BENCH_DIR, warn_if_busy, write_table
from bench.compression import FULL_SIZE, BenchSize, data_description, dense_artifact, dense_data, measure_bf16, measure_stage, ratio, runs_dir
from framework import artifacts
from framework.evaluation import PROMPT_TOKENS, SPEED_THREADS, measure_speed
from framework.hardware import describe_machine
from framework.models import load_model_dir
from framework.runtimes import TorchRuntime, open_runtime

log = logging.getLogger(__name__)

# (row, export overrides); the two torch rows come first.
EXPORTS = (
    ("GGUF F16", ("export=gguf", "export.outtype=F16")),
    ("GGUF Q8_0", ("export=gguf", "export.outtype=Q8_0")),
    ("GGUF Q4_0", ("export=gguf", "export.outtype=Q4_0")),
    ("ONNX fp32", ("export=onnx",)),
    ("ONNX int8", ("export=onnx", "export.bits=8")),
    ("ONNX int4", ("export=onnx", "export.bits=4")),
)
SPEED_KEYS = ("prefill_ms", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8")
ROUNDS = 5

DEPLOYMENT_COLUMNS = {
    "run": "format",
    "runtime": "runtime",
    "size_mb": "size (MB)",
    "size_ratio": "size / bf16",
    "val_ppl": "val ppl",
    "ppl_ratio": "ppl / fp32",
    "prefill_ms": "prefill (ms)",
    "prefill_ratio": "prefill speed / bf16",
    "decode_tokens_per_s_b1": "decode tok/s b1",
    "decode_b1_ratio": "decode b1 / bf16",
    "decode_tokens_per_s_b8": "decode tok/s b8",
    "decode_b8_ratio": "decode b8 / bf16",
    "decode_b1_spread": "b1 spread (max/min)",
}


def interleaved_speed(runtimes: dict, prompt, rounds: int) -> dict[str, dict]:
    """{row: median of each speed key, and the batch-1 decode spread}, timing every runtime once per round."""
    samples: dict[str, list[dict]] = {name: [] for name in runtimes}
    names = list(runtimes)
    for round_ in range(rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]  # who goes first changes each round
        for name in order:
            samples[name].append(measure_speed(runtimes[name], prompt, repeats=1))
    result = {}
    for name, runs in samples.items():
        result[name] = {key: statistics.median(run[key] for run in runs) for key in SPEED_KEYS}
        b1 = [run["decode_tokens_per_s_b1"] for run in runs]
        result[name]["decode_b1_spread"] = max(b1) / min(b1)
        result[name]["runtime"] = runs[0]["runtime"]
    return result


def deployment_rows(size: BenchSize, out_dir: str, exports: Sequence[tuple] = EXPORTS, rounds: int = ROUNDS) -> list[dict]:
    dense_dir, dense = dense_artifact(size, out_dir)
    cfg, tokenizer, data = dense_data(dense_dir, size)
    val = data.val_set.first(size.val_blocks)
    bf16 = measure_bf16(dense_dir, tokenizer, val[: size.bf16_val_blocks], cfg.data.batch_size)
    rows = [
        {"run": "torch fp32", "size_bytes": dense["size_bytes"], "val_ppl": dense["val_ppl"], "ppl_ratio": 1.0},
        {"run": "torch bf16", "size_bytes": bf16["size_bytes"], "val_ppl": bf16["val_ppl"], "ppl_ratio": ratio(bf16["val_ppl"], bf16["fp32_val_ppl_same_blocks"])},
    ]
    model_dirs = {}
    for label, overrides in exports:
        name = "export-" + "-".join(o.split("=")[-1] for o in overrides)
        run_dir = os.path.join(runs_dir(size, out_dir), name)
        metrics = measure_stage("export", size, run_dir, [f"input={dense_dir}", *overrides])
        rows.append({"run": label, "size_bytes": metrics["size_bytes"], "val_ppl": metrics["val_ppl"], "ppl_ratio": ratio(metrics["val_ppl"], dense["val_ppl"]),
                     "runtime": metrics["runtime"]})
        if not label.startswith("GGUF"):
            model_dirs[label] = os.path.join(run_dir, artifacts.MODEL)

    fp32_model = load_model_dir(os.path.join(dense_dir, artifacts.MODEL))
    runtimes = {"torch fp32": TorchRuntime(fp32_model), "torch bf16": TorchRuntime(copy.deepcopy(fp32_model).to(torch.bfloat16), "torch eager (bf16)")}
    runtimes.update({label: open_runtime(directory, SPEED_THREADS) for label, directory in model_dirs.items()})
    speed = interleaved_speed(runtimes, val[0, :PROMPT_TOKENS], rounds)
    for row in rows:
        row.update(speed.get(row["run"], {}))
    reference = next(row for row in rows if row["run"] == "torch bf16")
    for row in rows:
        row["size_mb"] = row["size_bytes"] / 1e6
        row["size_ratio"] = ratio(row["size_bytes"], reference["size_bytes"])
        if "prefill_ms" in row:
            row["prefill_ratio"] = ratio(reference["prefill_ms"], row["prefill_ms"])  # > 1: faster than bf16
            row["decode_b1_ratio"] = ratio(row["decode_tokens_per_s_b1"], reference["decode_tokens_per_s_b1"])
            row["decode_b8_ratio"] = ratio(row["decode_tokens_per_s_b8"], reference["decode_tokens_per_s_b8"])
    return rows


def deployment_table(size: BenchSize = FULL_SIZE, out_dir: str = BENCH_DIR, exports: Sequence[tuple] = EXPORTS, rounds: int = ROUNDS) -> str:
    """Measure the deployment table; write <out_dir>/deployment.json and .md; return the Markdown."""
    load_before = warn_if_busy()
    rows = deployment_rows(size, out_dir, exports, rounds)
    dense_dir = os.path.join(runs_dir(size, out_dir), "dense")
    by_run = {row["run"]: row for row in rows}
    torch_best = max(by_run["torch fp32"]["decode_tokens_per_s_b1"], by_run["torch bf16"]["decode_tokens_per_s_b1"])
    int8 = by_run.get("ONNX int8")
    goal = (
        f" ONNX int8 decodes at batch 1 at {int8['decode_tokens_per_s_b1'] / torch_best:.2f}x the faster of fp32 and bf16 torch, "
        f"perplexity x{int8['ppl_ratio']:.3f}, {int8['size_bytes'] / by_run['torch fp32']['size_bytes']:.2f}x the fp32 size (goal: >= 1.5x, within 2%, <= 0.3x)."
        if int8 else ""
    )
    caption = (
        f"Deployment formats of {data_description(dense_dir, size)}, the export stage on the fp32 dense artifact. "
        f"Speed: a {PROMPT_TOKENS}-token prompt (or the whole first val block if shorter) at batch 1, then decode tokens/s of all sequences "
        f"at batch 1 and 8, one thread per runtime; {rounds} interleaved rounds, medians; spread: max/min of the batch-1 decode rate. "
        f"bf16 perplexity on the first {size.bf16_val_blocks} val blocks, as a ratio to fp32 on those blocks. GGUF rows: size and "
        f"perplexity as transformers reads the file back (dequantized to fp32); their speed is llama.cpp's to measure.{goal} "
        f"Machine: {describe_machine()}."
    )
    return write_table("deployment", rows, DEPLOYMENT_COLUMNS, caption, {"size": asdict(size), "rounds": rounds, "load_avg_1m_before": load_before}, out_dir)
