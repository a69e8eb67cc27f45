"""The benchmark runs end to end at a toy size and writes a complete table (speed itself is never asserted)."""

import json
import math
import pytest

from bench.compression import (
    DISTILLATION_COLUMNS, PRUNE_RUNS, PRUNING_COLUMNS, QUANT_METHODS, QUANTIZATION_COLUMNS,
    BenchSize, distillation_table, pruning_table, quantization_table,
)
from bench.training import TRAIN_COLUMNS, scaling_table, train_table

# One warm-up and one timed step per precision on the nano model and short blocks; a given peak
# FLOP/s skips its measurement.
TOY_STEPS = {"32-true": (1, 1), "bf16-mixed": (1, 1)}
TOY_OVERRIDES = ["data.block_size=32", "data.max_val_blocks=2", "trainer.peak_flops=1e12"]


def test_train_table_has_every_run_and_positive_finite_ratios(tmp_path):
    markdown = train_table(TOY_STEPS, model="llama_nano", overrides=TOY_OVERRIDES, out_dir=str(tmp_path))

    table = json.loads((tmp_path / "train.json").read_text())
    assert [row["run"] for row in table["rows"]] == [
        "framework / 32-true", "plain loop / 32-true", "framework / bf16-mixed", "plain loop / bf16-mixed",
    ]
    for row in table["rows"]:
        for key in ("tokens_per_s", "vs_plain", "vs_fp32"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["run"], key)
    assert {"cpu", "cores", "torch", "avx512_bf16", "amx_bf16"} <= set(table["machine"])

    assert (tmp_path / "train.md").read_text() == markdown
    header, rule, *body = markdown.splitlines()[:6]
    assert header == "| " + " | ".join(TRAIN_COLUMNS.values()) + " |"
    assert [line.split(" | ")[0] for line in body] == [f"| {row['run']}" for row in table["rows"]]
    assert "1 timed steps after 1 warm-up" in markdown  # the caption states the step counts


@pytest.mark.slow
def test_scaling_table_runs_one_and_two_processes_on_the_same_data(tmp_path):
    scaling_table(processes=(1, 2), global_batch=8, steps=(1, 2), model="llama_nano", overrides=TOY_OVERRIDES, out_dir=str(tmp_path))
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [(r["processes"], r["batch_per_process"]) for r in rows] == [(1, 8), (2, 4)]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["vs_one_process"] == 1.0
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)  # same global batch, same trajectory


# --- the compression tables: the framework's stages on a toy model, 2 val blocks of 32 tokens -------------------
# Every stage also measures prefill and decode speed (seconds, even on a toy model), so the tests run a subset of
# the rows: an unstructured method without calibration and an N:M one with it; one int8 method.
# llama_tiny, not llama_nano: the distilled student keeps half the layers and needs at least 2.

TOY_SIZE = BenchSize(model="llama_tiny", val_blocks=2, bf16_val_blocks=2, distill_steps=2, overrides=("data.block_size=32", "trainer.peak_flops=1e12"))
TOY_PRUNE_RUNS = [run for run in PRUNE_RUNS if run[0] in ("magnitude 50%", "wanda 2:4")]
TOY_QUANT_METHODS = QUANT_METHODS[:1]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One output folder for the three tables, so that they make their dense artifact once, as a real run does."""
    return tmp_path_factory.mktemp("bench")


def read_table(out_dir, name: str) -> dict:
    table = json.loads((out_dir / f"{name}.json").read_text())
    table["columns"] = dict(table["columns"])  # [key, header] pairs, in display order
    markdown = (out_dir / f"{name}.md").read_text()
    assert markdown.splitlines()[0] == "| " + " | ".join(table["columns"].values()) + " |"
    assert [line.split(" | ")[0] for line in markdown.splitlines()[2:2 + len(table["rows"])]] == [f"| {row['run']}" for row in table["rows"]]
    assert table["machine"]["cores"] and table["caption"] in markdown
    return table


def assert_positive_finite(rows, keys):
    for row in rows:
        for key in keys:
            assert math.isfinite(row[key]) and row[key] > 0, (row["run"], key)


def test_pruning_table_reaches_its_sparsity(bench_dir):
    pruning_table(TOY_SIZE, str(bench_dir), TOY_PRUNE_RUNS)

    table = read_table(bench_dir, "pruning")
    assert list(table["columns"]) == list(PRUNING_COLUMNS)
    rows = table["rows"]
    assert [row["run"] for row in rows] == ["dense", "magnitude 50%", "wanda 2:4"]
    assert_positive_finite(rows, ("val_ppl", "vs_dense"))
    assert rows[0]["vs_dense"] == 1.0 and rows[0]["sparsity"] < 0.01
    for row in rows[1:]:
        assert abs(row["sparsity"] - 0.5) < 0.01 and row["wall_time_s"] > 0
        assert row["val_ppl_start"] == rows[0]["val_ppl"]  # every stage started from the same dense model
    assert rows[2]["n_m_ok"]
    assert (bench_dir / "runs" / TOY_SIZE.tag / "prune-wanda-2of4").is_dir()  # artifacts kept for reruns


def test_quantization_table_shrinks_the_model(bench_dir):
    quantization_table(TOY_SIZE, str(bench_dir), TOY_QUANT_METHODS)

    table = read_table(bench_dir, "quantization")
    assert list(table["columns"]) == list(QUANTIZATION_COLUMNS)
    rows = table["rows"]
    assert [row["run"] for row in rows] == ["fp32", "bf16", "int8 weight-only"]
    assert_positive_finite(rows, ("size_ratio", "ppl_ratio", "decode_ratio", "val_ppl", "decode_tokens_per_s_b1"))
    assert rows[0]["size_ratio"] == 1.0 and all(row["size_ratio"] < 1 for row in rows[1:])


def test_distillation_table_trains_both_students(bench_dir):
    distillation_table(TOY_SIZE, str(bench_dir))

    table = read_table(bench_dir, "distillation")
    assert list(table["columns"]) == list(DISTILLATION_COLUMNS)
    teacher, kd, alone = table["rows"]
    assert_positive_finite([teacher, kd, alone], ("params", "val_ppl", "vs_teacher"))
    assert_positive_finite([kd, alone], ("train_tokens_per_s", "wall_time_s"))
    assert kd["params"] == alone["params"] < teacher["params"]
    assert kd["train_steps"] == alone["train_steps"] == 2
    assert "2 steps of batch 4" in table["caption"]


def test_deployment_table_has_every_format_and_measures_the_runtimes(bench_dir):
    from bench.deployment import DEPLOYMENT_COLUMNS, EXPORTS, deployment_table

    exports = [e for e in EXPORTS if e[0] in ("GGUF Q8_0", "ONNX int8")]
    deployment_table(TOY_SIZE, str(bench_dir), exports, rounds=2)

    table = read_table(bench_dir, "deployment")
    assert list(table["columns"]) == list(DEPLOYMENT_COLUMNS)
    rows = {row["run"]: row for row in table["rows"]}
    assert list(rows) == ["torch fp32", "torch bf16", "GGUF Q8_0", "ONNX int8"]
    timed = [rows[name] for name in ("torch fp32", "torch bf16", "ONNX int8")]
    assert_positive_finite(timed, ("prefill_ms", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8", "decode_b1_ratio", "decode_b1_spread"))
    assert rows["torch bf16"]["decode_b1_ratio"] == 1.0 and rows["ONNX int8"]["runtime"] == "onnxruntime"
    assert "prefill_ms" not in rows["GGUF Q8_0"]  # llama.cpp's to time, not ours
    assert rows["ONNX int8"]["size_ratio"] < 0.75 and rows["GGUF Q8_0"]["size_ratio"] < 0.75  # against bf16
    assert "interleaved rounds" in table["caption"]


@pytest.mark.slow
def test_data_table_prepares_with_one_and_two_workers_and_trains_on_the_result(tmp_path):
    from bench.data import DATA_COLUMNS, data_table

    data_table(size=2_000_000, out_dir=str(tmp_path), steps=2)
    table = json.loads((tmp_path / "data.json").read_text())
    assert [key for key, _ in table["columns"]] == list(DATA_COLUMNS)
    tokenizer, one, two, train = table["rows"]
    assert tokenizer["run"].startswith("BPE tokenizer (trained") and [one["run"], two["run"]] == ["prepare, 1 worker", "prepare, 2 workers"]
    for row in (one, two):
        assert row["tokens_per_s"] > 0 and math.isfinite(row["vs_one_worker"])
    assert one["vs_one_worker"] == 1.0
    assert all(0 < row["peak_rss_mb"] < 24_000 for row in table["rows"])
    assert 0 < train["first_step_s"] < train["seconds"]
    assert table["corpus_bytes"] >= 2_000_000 and table["tokens"] > 100_000
    assert 0 < table["cache_bytes"] < table["corpus_bytes"]  # two bytes a token, several characters a token
    assert (tmp_path / "data.md").read_text().startswith("| step |")


@pytest.mark.slow
def test_classification_table_compares_every_compressed_classifier_with_its_teacher(tmp_path):
    from bench.classification import CLASSIFICATION_COLUMNS, classification_table

    classification_table(quick=True, out_dir=str(tmp_path), rounds=2, extra=["+common.precision.name=32-true"])
    table = read_table(tmp_path, "classification")
    assert list(table["columns"]) == list(CLASSIFICATION_COLUMNS)
    rows = {row["run"]: row for row in table["rows"]}
    assert list(rows) == ["teacher", "pruned", "KD student", "no-teacher student", "int8 student"]
    assert_positive_finite(rows.values(), ("val_accuracy", "params_ratio", "size_ratio", "latency_ms", "speedup", "latency_spread"))
    assert rows["teacher"]["speedup"] == rows["teacher"]["size_ratio"] == 1.0
    assert rows["int8 student"]["runtime"] == "onnxruntime" and rows["KD student"]["runtime"] == "torch eager"
    assert rows["KD student"]["params_ratio"] == rows["no-teacher student"]["params_ratio"] < 0.8  # 3 of 6 layers
    assert rows["int8 student"]["size_ratio"] < 0.5 * rows["KD student"]["size_ratio"]
    assert "interleaved rounds" in table["caption"]
