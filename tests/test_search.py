"""Hyperparameter search: TPE trials in a shared study, trials pruned on their val loss, failed trials
recorded, a second worker joining, and the summary (table, best config, plots)."""

import csv
import os
import socket
import subprocess
import sys

import optuna
import pytest
from omegaconf import OmegaConf

from framework.errors import ConfigError
from framework.search import parse_constraint, read_metric, search_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = [
    "model=llama_nano", "data.block_size=64", "data.max_val_blocks=16", "precision=32-true",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5",
]


def search(tmp_path, n_trials, *overrides):
    command = [
        sys.executable, "recipes/train.py", *FAST, "hparams_search=tiny_lr", f"paths.output_dir={tmp_path}",
        "trainer.max_steps=30", "trainer.val_check_interval=5",
        f"hparams_search.n_trials={n_trials}",
        "hparams_search.sampler.n_startup_trials=8",
        "hparams_search.pruner.n_startup_trials=2", "hparams_search.pruner.n_warmup_steps=5",
        # A range with hopeless learning rates (the pruner's work), and one warmup value that is invalid
        # (a trial that fails).
        "hparams_search.params.optimizer.lr='tag(log, interval(1e-6, 1e-2))'",
        "hparams_search.params.scheduler.warmup_steps='choice(0, 5, 10, -1)'",
        *overrides,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_search_prunes_lagging_trials_records_failures_and_a_second_worker_joins(tmp_path):
    first = search(tmp_path, 8)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "train_tiny_lr"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "study.journal")))
    study = optuna.load_study(study_name="train_tiny_lr", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(states) == 8
    assert "PRUNED" in states and "COMPLETE" in states
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all(t.params["scheduler.warmup_steps"] == -1 for t in failed)
    assert all("scheduler.warmup_steps" in t.user_attrs["error"] for t in failed)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert all(len(t.intermediate_values) < 6 for t in pruned)  # stopped before the last of 6 validations

    # The summary: a row per trial, the best trial's params and full config, the two plots.
    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == states
    best = OmegaConf.load(sweep_dir / "best.yaml")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert best.value == pytest.approx(min(t.value for t in complete))
    assert best.config.optimizer.lr == pytest.approx(best.params["optimizer.lr"])
    assert best.config.trainer.max_steps == 30 and best.config.hparams_search is None
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (sweep_dir / plot).stat().st_size > 10_000

    # A worker killed in the middle of a trial leaves it running: the next worker of this machine fails it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = study.ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")

    # A second worker (another process; could be another machine on an RDB) adds to the same study.
    second = search(tmp_path, 11)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="train_tiny_lr", storage=storage)
    assert len(study.trials) == 11
    assert study.trials[8].state.name == "FAIL" and study.trials[8].user_attrs["error"] == "its worker process died"
    assert len({t.user_attrs["worker"] for t in study.trials}) == 3  # the first worker, the dead one, the second
    # It samples afresh instead of replaying the first worker's seeded sequence.
    assert study.trials[9].params != study.trials[0].params


def test_search_space_reads_hydra_sweep_syntax():
    distributions, fixed = search_space({
        "optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
        "optimizer": {"weight_decay": "choice(0.0, 0.1)"},
        "scheduler.warmup_steps": "range(0, 20, 5)",
        "model": "choice(llama_nano, gpt2_tiny)",
        "trainer.max_steps": "50",
        "data.batch_size": "tag(int, interval(4, 16))",
    })
    assert distributions["optimizer.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert distributions["optimizer.weight_decay"] == optuna.distributions.CategoricalDistribution([0.0, 0.1])
    assert distributions["scheduler.warmup_steps"] == optuna.distributions.IntDistribution(0, 15, step=5)
    assert distributions["model"].choices == ("llama_nano", "gpt2_tiny")
    assert distributions["data.batch_size"] == optuna.distributions.IntDistribution(4, 16)
    assert fixed == ["trainer.max_steps=50"]
    with pytest.raises(ConfigError, match="hparams_search.params.optimizer.lr"):
        search_space({"optimizer.lr": "interval(1e-4"})
    with pytest.raises(ConfigError, match="empty range"):
        search_space({"scheduler.warmup_steps": "range(10, 0, 5)"})


def test_objective_and_constraints_read_stage_metrics(tmp_path):
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "metrics.json").write_text('{"val_ppl": 41.5}')
    (tmp_path / "metrics.json").write_text('{"val_loss": 3.2}')
    assert read_metric(str(tmp_path), "val_loss") == 3.2
    assert read_metric(str(tmp_path), "distill.val_ppl") == 41.5
    with pytest.raises(KeyError, match="quantize.size_bytes"):
        read_metric(str(tmp_path), "quantize.size_bytes")
    assert parse_constraint("quantize.size_bytes <= 2e6") == ("quantize.size_bytes", "<=", 2e6)
    with pytest.raises(ConfigError, match="hparams_search.constraints"):
        parse_constraint("size < big")


@pytest.mark.slow
def test_pipeline_search_optimizes_a_stage_metric_under_a_constraint(tmp_path):
    """Objective and constraint come from the pipeline's stages: the quantized model's perplexity, with a
    bound on the pretrained model's val loss that the slowest learning rates miss."""
    command = [
        sys.executable, "recipes/pipeline.py", "experiment=tiny_pipeline", "hparams_search=tiny_student", f"paths.output_dir={tmp_path}",
        "~pipeline.stages.finetune", "~pipeline.stages.prune", "~pipeline.stages.distill", "~pipeline.stages.export",
        "pipeline.stages.quantize.input=pretrain", "pipeline.evaluate_on=pretrain",
        "pipeline.stages.pretrain.groups.model=llama_nano", "pipeline.stages.pretrain.trainer.max_steps=20",
        "pipeline.stages.pretrain.trainer.val_check_interval=5",
        "+common.trainer.enable_progress_bar=false", "+common.data.max_val_blocks=8", "+common.precision.name=32-true",
        "hparams_search.objective=quantize.val_ppl", "hparams_search.constraints=['pretrain.val_loss <= 7.5']",
        "hparams_search.n_trials=4", "hparams_search.pruner.name=none",
        "~hparams_search.params.pipeline.stages.distill",
        "+hparams_search.params.pipeline.stages.pretrain.optimizer.lr='tag(log, interval(1e-5, 1e-2))'",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "pipeline_tiny_student"
    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    for row in rows:  # each trial ran the pipeline into its own directory
        trial_dir = sweep_dir / f"trial_{int(row['trial']):03d}"
        assert float(row["value"]) == pytest.approx(read_metric(str(trial_dir), "quantize.val_ppl"))
        assert (row["feasible"] == "True") == (read_metric(str(trial_dir), "pretrain.val_loss") <= 7.5)
    feasible = [r for r in rows if r["feasible"] == "True"]
    best = OmegaConf.load(sweep_dir / "best.yaml")
    assert feasible  # the seeded search finds learning rates on both sides of the bound
    assert best.value == pytest.approx(min(float(r["value"]) for r in feasible))
