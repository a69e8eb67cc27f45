"""The benchmark runs end to end at a toy size and writes a complete table (speed itself is never asserted)."""

import json
import math

from framework.benchmark import TRAIN_COLUMNS, train_table

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
