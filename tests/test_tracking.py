"""Tracking: a pipeline is one tree of MLflow runs on a real server, a search or a sweep one parent of its
trials or jobs, and a stage cut short and resumed continues its runs (MLflow, CSV) with no step logged twice.
The MLflow checks go through the server's REST API, as a teammate's tool would."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import lightning.pytorch as pl
import pytest

from framework.artifacts import is_complete, read_fingerprint
from framework.errors import ConfigError
from framework.stages import STAGES
from framework.training import extra_callbacks
from tests.conftest import FAST
from tests.test_pipeline import SMALL
from tests.test_pipeline import STAGES as PIPELINE_STAGES

# --- the REST API --------------------------------------------------------------------------------------------


def rest_get(server, endpoint, **query):
    with urllib.request.urlopen(f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}") as response:
        return json.load(response)


def rest_post(server, endpoint, body):
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{endpoint}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def runs(server, experiment, filter_string=""):
    experiment_id = rest_get(server, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    return rest_post(server, "runs/search", {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}).get("runs", [])


def children(server, experiment, parent):
    return runs(server, experiment, f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'")


def top_level(server, experiment):
    return [run for run in runs(server, experiment) if "mlflow.parentRunId" not in tags(run)]


def tags(run):
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def params(run):
    return {param["key"]: param["value"] for param in run["data"].get("params", [])}


def metrics(run):
    return {metric["key"]: metric["value"] for metric in run["data"].get("metrics", [])}


def history_steps(server, run, key):
    history = rest_get(server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key, max_results=10000)
    return sorted(point["step"] for point in history.get("metrics", []))


def artifact_paths(server, run):
    return {entry["path"] for entry in rest_get(server, "artifacts/list", run_id=run["info"]["run_id"]).get("files", [])}


def mlflow_overrides(server, experiment):
    return ["logger=mlflow", f"logger.tracking_uri={server}", f"logger.experiment={experiment}"]


def csv_steps(stage_dir, key="train/loss"):
    with open(os.path.join(stage_dir, "logs", "metrics.csv"), newline="") as f:
        return [(int(row["step"]), row[key]) for row in csv.DictReader(f) if row.get(key)]


# --- a pipeline ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_is_one_tree_of_runs_and_a_killed_stage_continues_its_run(mlflow_server, tmp_path):
    """The tiny pipeline with logger=mlflow, SIGKILLed in finetune after a checkpoint, then run again."""
    experiment = "pipeline-tree"
    command = [
        sys.executable, "recipes/pipeline.py", *(o for o in SMALL if not o.startswith("logger=")), *mlflow_overrides(mlflow_server, experiment),
        f"run_dir={tmp_path}", "+common.trainer.log_every_n_steps=1",
        "pipeline.stages.pretrain.trainer.max_steps=8", "pipeline.stages.prune.trainer.max_steps=4", "pipeline.stages.distill.trainer.max_steps=4",
        "pipeline.stages.finetune.trainer.max_steps=30", "+pipeline.stages.finetune.trainer.checkpoint_every_n_steps=5",
    ]
    finetune = tmp_path / "finetune"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Killed between two checkpoints, after steps the resumed stage will train again.
    while process.poll() is None and time.time() < deadline:
        if (finetune / "checkpoints" / "last.ckpt").exists() and (finetune / "logs" / "metrics.csv").exists() and max((s for s, _ in csv_steps(finetune)), default=0) >= 7:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not is_complete(str(finetune)), "finetune finished before it was killed"
    logged_before_kill = csv_steps(finetune)

    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr

    # One parent run, named after the pipeline, with one child per stage.
    (parent,) = top_level(mlflow_server, experiment)
    assert parent["info"]["run_name"] == "tiny" and parent["info"]["status"] == "FINISHED"
    assert "report.png" in artifact_paths(mlflow_server, parent)
    stage_runs = {run["info"]["run_name"]: run for run in children(mlflow_server, experiment, parent)}
    assert sorted(stage_runs) == sorted(PIPELINE_STAGES)
    for name, run in stage_runs.items():
        stage_dir = str(tmp_path / name)
        assert run["info"]["status"] == "FINISHED", name
        assert params(run)["seed"] == "1234" and "optimizer.lr" in params(run) and len(params(run)) > 50, name
        assert metrics(run)["val_ppl"] > 1, name
        assert history_steps(mlflow_server, run, "val/loss")[0] == 0, name  # the curves start at the model it was given
        assert tags(run)["kind"] == {"pretrain": "train", "finetune": "train"}.get(name, name)
        assert tags(run)["fingerprint"] == read_fingerprint(stage_dir)
        assert {"metrics.json", "config.yaml", "model"} <= artifact_paths(mlflow_server, run), name
    for name, inputs in {"pretrain": [], "finetune": ["pretrain"], "prune": ["finetune"], "quantize": ["prune"], "distill": ["finetune"]}.items():
        run_tags = tags(stage_runs[name])
        assert run_tags["inputs"] == ",".join(inputs)
        assert {k: v for k, v in run_tags.items() if k.startswith("input.")} == {f"input.{i}": read_fingerprint(str(tmp_path / i)) for i in inputs}
    for name, steps in {"pretrain": 8, "prune": 4, "distill": 4}.items():
        assert history_steps(mlflow_server, stage_runs[name], "train/loss") == list(range(steps))
    # distill's baseline (the student without a teacher) nests under distill, not beside the stages.
    (baseline,) = children(mlflow_server, experiment, stage_runs["distill"])
    assert baseline["info"]["run_name"] == "distill-baseline" and metrics(baseline)["val_ppl"] > 1

    # The killed stage: one run, each of its 30 steps logged once, the rows from before the kill kept.
    assert len(runs(mlflow_server, experiment, "attributes.run_name = 'finetune'")) == 1
    assert history_steps(mlflow_server, stage_runs["finetune"], "train/loss") == list(range(30))
    assert [s for s, _ in csv_steps(str(finetune))] == list(range(30))
    assert csv_steps(str(finetune))[: len(logged_before_kill)] == logged_before_kill

    # The last stage's model is a registered version a teammate loads by name and version.
    versions = rest_get(mlflow_server, "model-versions/search", filter="name='pipeline-tiny-distill'")["model_versions"]
    assert [v["run_id"] for v in versions] == [stage_runs["distill"]["info"]["run_id"]]
    import mlflow

    from framework.models import load_model_dir

    mlflow.set_tracking_uri(mlflow_server)
    model_dir = mlflow.artifacts.download_artifacts(f"models:/pipeline-tiny-distill/{versions[0]['version']}", dst_path=str(tmp_path / "picked"))
    assert load_model_dir(model_dir).config.num_hidden_layers == 2


# --- searches and sweeps -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_is_one_parent_with_a_child_per_trial_and_its_state(mlflow_server, tmp_path):
    experiment = "search"
    command = [
        sys.executable, "recipes/train.py", *FAST, *mlflow_overrides(mlflow_server, experiment), "hparams_search=tiny_lr",
        "hparams_search.n_trials=3", "hparams_search.study_name=lr3", f"paths.output_dir={tmp_path}", "trainer.max_steps=3", "trainer.val_check_interval=1000",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    (parent,) = top_level(mlflow_server, experiment)
    assert parent["info"]["run_name"] == "lr3" and tags(parent)["kind"] == "study"
    assert {"trials.csv", "best.yaml"} <= artifact_paths(mlflow_server, parent)
    trials = {run["info"]["run_name"]: run for run in children(mlflow_server, experiment, parent)}
    assert sorted(trials) == ["trial_000", "trial_001", "trial_002"]
    with open(tmp_path / "sweeps" / "lr3" / "trials.csv", newline="") as f:
        study = {f"trial_{int(row['trial']):03d}": row for row in csv.DictReader(f)}
    for name, run in trials.items():
        assert tags(run)["state"] == study[name]["state"] == "COMPLETE" and run["info"]["status"] == "FINISHED"
        assert metrics(run)["objective"] == pytest.approx(float(study[name]["value"]))
        assert float(params(run)["optimizer.lr"]) == pytest.approx(float(study[name]["optimizer.lr"]))
        assert history_steps(mlflow_server, run, "train/loss") == [0, 1, 2]


@pytest.mark.slow
def test_grid_sweep_is_one_parent_with_a_child_per_job_failed_ones_too(mlflow_server, tmp_path):
    experiment = "sweep"
    command = [sys.executable, "recipes/train.py", "-m", *FAST, *mlflow_overrides(mlflow_server, experiment), "optimizer.lr=1e-3,-1", f"paths.output_dir={tmp_path}", "trainer.max_steps=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0  # a job failed: the sweep says so at its end

    (parent,) = top_level(mlflow_server, experiment)
    assert parent["info"]["run_name"] == "train-sweep" and parent["info"]["status"] == "FINISHED"
    jobs = {tags(run)["state"]: run for run in children(mlflow_server, experiment, parent)}
    assert sorted(jobs) == ["COMPLETED", "FAILED"]
    assert params(jobs["COMPLETED"])["optimizer.lr"] == "0.001" and metrics(jobs["COMPLETED"])["val_loss"] > 0
    assert jobs["COMPLETED"]["info"]["status"] == "FINISHED" and history_steps(mlflow_server, jobs["COMPLETED"], "train/loss") == [0, 1]
    assert params(jobs["FAILED"])["optimizer.lr"] == "-1" and jobs["FAILED"]["info"]["status"] == "FAILED"
    assert tags(jobs["FAILED"])["error"].startswith("ConfigError: optimizer.lr")


# --- without a server ----------------------------------------------------------------------------------------


def test_a_tracking_uri_where_no_server_answers_is_refused_before_any_work(train_config):
    from tests.mlflow_server import free_port

    cfg = train_config("logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"^logger.tracking_uri: no MLflow server answers at http://127.0.0.1:\d+ .*make tracking"):
        STAGES["train"].validate(cfg)


class CrashAt(pl.Callback):
    """A crash before optimizer step `step + 1`: unlike Ctrl-C, it saves no checkpoint, so the resumed run
    trains again the steps after the last one."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def test_csv_log_keeps_every_step_across_a_crash_and_resume(train_config, tmp_path):
    cfg = train_config("trainer.max_steps=12", "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=6")
    with pytest.raises(RuntimeError, match="crash"), extra_callbacks([CrashAt(7)]):
        STAGES["train"](cfg)
    before = csv_steps(str(tmp_path / "run"))
    assert [s for s, _ in before] == list(range(7))  # steps 0-6 logged; the checkpoint is at step 4

    STAGES["train"](cfg)  # resumes from step 4: steps 4-6 are trained again, and not logged again
    after = csv_steps(str(tmp_path / "run"))
    assert [s for s, _ in after] == list(range(12))
    assert after[:7] == before
    assert [s for s, _ in csv_steps(str(tmp_path / "run"), "val/loss")] == [0, 5, 11]  # 0: the model it started from
