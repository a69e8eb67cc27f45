"""The pipeline: one command runs every stage, reruns skip finished work, changes rerun only what follows."""

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from framework.artifacts import COMPLETE, is_complete, read_metrics
from framework.pipeline import run_pipeline
from tests.conftest import compose_config

# The tiny pipeline, shrunk for tests: the nano model, short stages, few validation blocks.
SMALL = [
    "experiment=tiny_pipeline",
    "logger=wandb",
    "+common.trainer.enable_progress_bar=false",
    "+common.data.max_val_blocks=8",
    "+common.data.max_chars=120000",
    "+common.precision.name=32-true",
    "pipeline.stages.pretrain.groups.model=llama_nano",
    "pipeline.stages.pretrain.trainer.max_steps=40",
    "pipeline.stages.finetune.trainer.max_steps=15",
    "pipeline.stages.prune.trainer.max_steps=10",
    "+pipeline.stages.prune.prune.calibration_samples=8",
    "pipeline.stages.distill.trainer.max_steps=15",
    "pipeline.stages.distill.distill.num_layers=2",
    "+pipeline.stages.distill.distill.intermediate_ratio=0.5",
]
STAGES = ["pretrain", "finetune", "prune", "quantize", "distill", "export"]


def pipeline_config(run_dir, *overrides):
    return compose_config("pipeline", [*SMALL, *overrides], run_dir=str(run_dir))


def completion_times(run_dir):
    return {s: os.stat(run_dir / s / COMPLETE).st_mtime_ns for s in STAGES}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    rows = run_pipeline(pipeline_config(run_dir))
    return run_dir, rows


def test_pipeline_runs_every_stage_and_reports_measured_numbers(finished_run):
    run_dir, rows = finished_run
    assert [r["stage"] for r in rows] == STAGES
    for r in rows:
        assert is_complete(r["stage_dir"]) and r["status"] == "ran"
        assert r["val_ppl"] > 1 and r["size_mb"] > 0 and r["params_total"] > 0
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s_b1"] > 0 and r["decode_tokens_per_s_b8"] > 0 and r["runtime"]
        assert r["sample"].startswith("In Python, a list")
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["quantize"]["size_mb"] < 0.35 * by_stage["prune"]["size_mb"]
    assert by_stage["export"]["size_mb"] < 0.4 * by_stage["distill"]["size_mb"] and by_stage["export"]["runtime"] == "onnxruntime"
    assert (run_dir / "export" / "model" / "model.onnx").is_file()
    assert by_stage["prune"]["params_nonzero"] < by_stage["finetune"]["params_nonzero"]
    assert read_metrics(str(run_dir / "prune"))["prunable_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert by_stage["distill"]["params_total"] < by_stage["finetune"]["params_total"]
    for name in ("report.md", "report.json", "report.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "| quantize | quantize |" in (run_dir / "report.md").read_text()


def wandb_records(path):
    """The protobuf records of an offline wandb run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, pending = path.read_bytes(), 7, b""  # 7: the file header
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # block trailer padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield Record.FromString(pending)


def test_wandb_offline_has_one_run_per_stage_in_one_group_with_lineage(finished_run):
    run_dir, _ = finished_run
    runs, artifacts = {}, {}
    for stage in STAGES:
        files = list((run_dir / stage / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, stage
        for record in wandb_records(files[0]):
            if record.HasField("run"):
                runs[stage] = record.run
            if record.HasField("artifact"):
                artifacts[record.artifact.name] = json.loads(record.artifact.metadata)
    assert {run.run_group for run in runs.values()} == {"pipeline-tiny"}
    assert {stage: run.job_type for stage, run in runs.items()} == {s: s if s in ("prune", "quantize", "distill", "export") else "train" for s in STAGES}
    assert artifacts["pipeline-tiny-prune"]["uses"] == ["pipeline-tiny-finetune"]
    assert artifacts["pipeline-tiny-distill"]["uses"] == ["pipeline-tiny-finetune"]
    assert artifacts["pipeline-tiny-export"]["uses"] == ["pipeline-tiny-distill"]
    assert artifacts["pipeline-tiny-quantize"]["metrics"]["val_ppl"] > 1


def test_second_identical_run_trains_nothing(finished_run):
    run_dir, _ = finished_run
    before = completion_times(run_dir)
    started = time.perf_counter()
    rows = run_pipeline(pipeline_config(run_dir))
    assert all(r["cached"] for r in rows)
    assert completion_times(run_dir) == before
    assert time.perf_counter() - started < 30


def test_changing_quantize_reruns_quantize_and_the_stages_after_it_only(finished_run):
    run_dir, _ = finished_run
    before = completion_times(run_dir)
    rows = run_pipeline(pipeline_config(run_dir, "pipeline.stages.quantize.groups.quantize=int8_dynamic"))
    after = completion_times(run_dir)
    assert [r["stage"] for r in rows if not r["cached"]] == ["quantize", "distill", "export"]
    assert {s for s in STAGES if after[s] != before[s]} == {"quantize", "distill", "export"}
    assert read_metrics(str(run_dir / "quantize"))["quantization"] == "int8_dynamic"


def test_a_damaged_stage_is_found_on_rerun_and_made_again(finished_run):
    from framework.artifacts import damaged

    run_dir, rows = finished_run
    run_pipeline(pipeline_config(run_dir))  # back to the default settings, whatever an earlier test changed
    weights = run_dir / "prune" / "model" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    before = completion_times(run_dir)
    again = run_pipeline(pipeline_config(run_dir))
    assert [r["stage"] for r in again if not r["cached"]] == ["prune"]  # the rest still matches its fingerprint
    assert weights.stat().st_size == size and damaged(str(run_dir / "prune")) is None
    assert {r["stage"]: r["size_mb"] for r in again} == {r["stage"]: r["size_mb"] for r in rows}
    assert completion_times(run_dir)["quantize"] == before["quantize"]


def test_misspelt_stage_key_is_refused_before_any_work(tmp_path):
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="pipeline.stages.prune.prune.sparsty"):
        run_pipeline(pipeline_config(tmp_path, "+pipeline.stages.prune.prune.sparsty=0.7"))
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.slow
def test_sigkill_during_prune_recovery_resumes_without_redoing_earlier_stages(tmp_path):
    command = [
        sys.executable, "recipes/pipeline.py", *SMALL, f"run_dir={tmp_path}",
        "pipeline.stages.prune.trainer.max_steps=400", "+pipeline.stages.prune.trainer.checkpoint_every_n_steps=5",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "prune" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    assert checkpoint.exists(), "the prune stage never wrote a checkpoint"
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not is_complete(str(tmp_path / "prune"))
    finished_before = {s: os.stat(tmp_path / s / COMPLETE).st_mtime_ns for s in ("pretrain", "finetune")}

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" in result.stderr + result.stdout
    assert {s: os.stat(tmp_path / s / COMPLETE).st_mtime_ns for s in ("pretrain", "finetune")} == finished_before
    for stage in STAGES:
        assert is_complete(str(tmp_path / stage))
    assert read_metrics(str(tmp_path / "prune"))["train_steps"] == 400
    # The killed stage continued its tracker runs, with no step logged twice: offline wandb wrote one directory
    # per process, both of the same run; the CSV log kept its rows from before the kill.
    run_ids, wandb_steps = set(), []
    files = sorted((tmp_path / "prune" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    for path in files:
        for record in wandb_records(path):
            if record.HasField("run"):
                run_ids.add(record.run.run_id)
            if record.HasField("history"):
                wandb_steps.append(record.history.step.num)
    assert len(run_ids) == 1
    assert len(wandb_steps) == len(set(wandb_steps)) and max(wandb_steps) == 400  # 0-399 trained, 400: the final metrics
    with open(tmp_path / "prune" / "logs" / "metrics.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]] == list(range(9, 400, 10))  # every 10th step


def test_loss_curve_of_a_resumed_stage_keeps_the_rerun_of_each_replayed_step(tmp_path):
    """A stage killed after step 3 and resumed from its step-2 checkpoint logs step 3 twice."""
    from framework.report import loss_curve

    (tmp_path / "logs").mkdir()
    rows = [(1, 5.0), (2, 4.0), (3, 3.9), (3, 3.5), (4, 3.0)]
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss,val_loss\n" + "".join(f"{s},{l},\n" for s, l in rows) + "4,,3.2\n")
    assert loss_curve(str(tmp_path)) == ([1, 2, 3, 4], [5.0, 4.0, 3.5, 3.0])


@pytest.mark.slow
def test_pipeline_trains_every_stage_on_two_processes(tmp_path):
    """`strategy=ddp trainer.devices=2`: each training stage launches its own ranks; one-shot stages do not."""
    command = [sys.executable, "recipes/pipeline.py", *SMALL, f"run_dir={tmp_path}", "strategy=ddp", "trainer.devices=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    # pretrain, finetune, prune (its recovery) and distill (baseline and student share one launch); not quantize.
    assert output.count("launched 1 worker processes") == 4
    for stage in STAGES:
        assert is_complete(str(tmp_path / stage))
    assert read_metrics(str(tmp_path / "prune"))["prunable_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert (tmp_path / "report.md").exists()
