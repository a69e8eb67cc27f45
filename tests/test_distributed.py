"""Multi-process training from the command line, on the CPU (gloo): DDP on 2 processes, model_parallel (FSDP2),
2 "nodes" on localhost (torchrun, and by hand), srun's environment, Hydra multiruns of DDP jobs, a
save-and-requeue on SIGUSR1, and the submitit launcher. Each way of starting the ranks must follow the loss
trajectory of one process at the same global batch."""

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from framework.artifacts import is_complete, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 12 steps of the nano model at a global batch of 8; validation twice, so the val loss is compared too.
SMALL = [
    "model=llama_nano", "data.block_size=64", "data.max_val_blocks=16", "precision=32-true",
    "trainer.enable_progress_bar=false", "trainer.max_steps=12", "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1", "optimizer.lr=3e-3",
]
# Two processes do not sum in the same order as one: the trajectories agree to float32 reduction noise.
TRAJECTORY_RTOL = 1e-4


def recipe(*args, output_dir, timeout=600, env=None, script="recipes/train.py"):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    command = [sys.executable, script, *flags, *SMALL, *overrides, f"paths.output_dir={output_dir}"]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def only_run_dir(output_dir, job="train"):
    """The one run directory of a single run (fails if the ranks made several)."""
    runs = [p for p in (output_dir / job).iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, got {[p.name for p in runs]}"
    return runs[0]


def train_losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_trajectory(run_dir, reference_dir):
    losses, reference = train_losses(run_dir), train_losses(reference_dir)
    assert sorted(losses) == sorted(reference) and len(losses) == 12
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], rel=TRAJECTORY_RTOL), f"step {step}"
    assert read_metrics(str(run_dir))["val_loss"] == pytest.approx(read_metrics(str(reference_dir))["val_loss"], rel=TRAJECTORY_RTOL)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The reference: one process at a per-device batch of 8."""
    output_dir = tmp_path_factory.mktemp("single")
    result = recipe("data.batch_size=8", output_dir=output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(output_dir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_writes_one_run_and_follows_the_single_process_trajectory(single_process_run, tmp_path):
    result = recipe("strategy=ddp", "trainer.devices=2", "data.batch_size=4", "logger=wandb", output_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launched 1 worker processes" in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path)
    assert is_complete(str(run_dir))
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # one wandb run, not one per rank
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]
    # Half the per-device batch on two ranks is the single process's global batch: same data, same steps.
    assert_same_trajectory(run_dir, single_process_run)


@pytest.mark.slow
def test_model_parallel_shards_the_weights_and_follows_the_single_process_trajectory(single_process_run, tmp_path):
    """FSDP2 (fully_shard per decoder layer) over 2 CPU processes: same steps as DDP, weights gathered for the artifact."""
    result = recipe("strategy=model_parallel", "trainer.devices=2", "data.batch_size=4", output_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert is_complete(str(run_dir)) and (run_dir / "checkpoints" / "last.ckpt").is_file()  # one file, not a folder of shards
    assert_same_trajectory(run_dir, single_process_run)


@pytest.mark.slow
def test_two_nodes_on_localhost_through_torchrun(single_process_run, tmp_path):
    port = free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [*SMALL, "strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=4", f"paths.output_dir={tmp_path}"]
    nodes = [
        subprocess.Popen(
            [torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "recipes/train.py", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "launched" not in outputs[0]  # torchrun started the processes: nothing relaunched
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    run_dir = only_run_dir(tmp_path)
    assert is_complete(str(run_dir))
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]  # the node-rank-1 process wrote none
    assert_same_trajectory(run_dir, single_process_run)


@pytest.mark.slow
def test_two_nodes_started_by_hand_each_launch_their_own_ranks(single_process_run, tmp_path):
    """No torchrun: the same command on each "node" with MASTER_ADDR/PORT and NODE_RANK; 2 x 2 processes."""
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [*SMALL, "strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2", "data.batch_size=2", f"paths.output_dir={tmp_path}"]
    nodes = [
        subprocess.Popen(
            [sys.executable, "recipes/train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **rendezvous, "NODE_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "launched 1 worker processes (node rank 1" in outputs[1]
    assert "GLOBAL_RANK: 3, MEMBER: 4/4" in outputs[1]
    run_dir = only_run_dir(tmp_path)
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]
    assert_same_trajectory(run_dir, single_process_run)


@pytest.mark.slow
def test_two_tasks_started_by_srun_are_not_relaunched(single_process_run, tmp_path):
    """The environment srun gives each task (SLURM_*), simulated: Lightning takes the ranks from it."""
    port, job_id = free_port(), "4242"
    slurm = {
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port),
    }
    args = [*SMALL, "strategy=ddp", "trainer.devices=2", "data.batch_size=4", f"paths.output_dir={tmp_path}"]
    tasks = [
        subprocess.Popen(
            [sys.executable, "recipes/train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "launched" not in outputs[0]
    run_dir = only_run_dir(tmp_path)
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]
    assert_same_trajectory(run_dir, single_process_run)


@pytest.mark.slow
def test_multirun_of_ddp_jobs_with_a_failing_job_completes_the_others(tmp_path):
    result = recipe("-m", "strategy=ddp", "trainer.devices=2", "data.batch_size=4", "optimizer.lr=1e-3,-1,2e-3", output_dir=tmp_path)
    assert result.returncode != 0  # Hydra reports the failed job once all jobs have run
    assert "optimizer.lr: must be > 0, got -1" in result.stderr
    sweep_dir = tmp_path / "train" / "multirun"
    jobs = {p.name.split("optimizer.lr=")[1].split(",")[0]: p for p in sweep_dir.iterdir() if p.is_dir()}
    assert is_complete(str(jobs["0.001"])) and is_complete(str(jobs["0.002"]))
    assert not is_complete(str(jobs["-1"]))
    # Each job had its own process group: the second one trained its 12 steps after the failure.
    assert read_metrics(str(jobs["0.002"]))["train_steps"] == 12
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert summary.count("| COMPLETED |") == 2 and summary.count("| FAILED |") == 1
    assert "ConfigError: optimizer.lr: must be > 0" in summary


@pytest.mark.slow
def test_sigusr1_during_ddp_saves_a_checkpoint_and_the_rerun_resumes_to_the_same_end(tmp_path):
    """The signal reaches rank 0 only; both ranks agree to stop at the same step, save, and exit."""
    args = ["strategy=ddp", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=150", "trainer.val_check_interval=150", "trainer.checkpoint_every_n_steps=1000"]
    reference = recipe(*args, output_dir=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    command = [sys.executable, "recipes/train.py", *SMALL, *args, f"paths.output_dir={tmp_path / 'run'}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        logs = list((tmp_path / "run").glob("train/*/logs/metrics.csv"))
        if logs and len(logs[0].read_text().splitlines()) > 20:  # training is under way
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 4, stderr[-3000:]  # EXIT_PREEMPTED: saved, rerun to resume
    run_dir = only_run_dir(tmp_path / "run")
    assert not is_complete(str(run_dir)) and (run_dir / "checkpoints" / "last.ckpt").exists()
    stopped_at = int(stderr.split("at step ")[-1].split(";")[0])
    assert 0 < stopped_at < 150

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    resumed, uninterrupted = read_metrics(str(run_dir)), read_metrics(str(only_run_dir(tmp_path / "reference")))
    assert resumed["train_steps"] == 150
    assert resumed["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-5)


def test_a_worker_that_outlives_rank_zero_is_killed_after_the_grace_period():
    """Rank 0 leaving first must not wait forever: a worker stuck in a collective ignores SIGTERM
    (Lightning's handler broadcasts from the departed rank 0), so it is killed, not terminated."""
    from framework.launch import _stop_workers

    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    started = time.monotonic()
    _stop_workers([finished, stuck], grace_s=2)
    assert time.monotonic() - started < 30
    assert finished.returncode == 0 and stuck.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_ddp_job_end_to_end(tmp_path):
    result = recipe("launcher=local", "strategy=ddp", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=4", output_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "multirun"
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(jobs) == 1 and is_complete(str(jobs[0]))
    assert read_metrics(str(jobs[0]))["train_steps"] == 4
    assert "launched 1 worker processes" in (jobs[0] / "train.log").read_text()  # DDP inside the submitit job
    # The job ran as a submitit job (pickled, in its own process), which left its logs and result.
    submitit_logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert submitit_logs and list((sweep_dir / ".submitit").glob("*/*_result.pkl"))
    assert json.loads((jobs[0] / "job_status.json").read_text())["status"] == "COMPLETED"


def test_several_nodes_without_a_rendezvous_get_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")}
    command = [sys.executable, "recipes/train.py", *SMALL, "strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2", f"paths.output_dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: trainer.num_nodes: 2 nodes need MASTER_ADDR, MASTER_PORT, NODE_RANK" in result.stderr


def test_sigusr1_under_submitit_saves_then_hands_over_to_its_requeue_handler(train_config, tmp_path, caplog):
    """submitit installs its own SIGUSR1 handler (requeue, then exit); ours saves last.ckpt first."""
    import lightning.pytorch as pl

    from framework.stages import STAGES
    from framework.training import extra_callbacks

    train = STAGES["train"]

    calls = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
        calls.append(checkpoint.exists())
        raise SystemExit(144)  # submitit's local "requeue me" exit code

    class SignalAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, submitit_handler)
    try:
        with pytest.raises(SystemExit) as exit_info, extra_callbacks([SignalAt()]):
            train(train_config("trainer.max_steps=50"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert exit_info.value.code == 144 and calls == [True]
    assert not is_complete(str(tmp_path / "run"))
    caplog.set_level(logging.INFO, logger="framework.training")
    metrics = train(train_config("trainer.max_steps=50"))  # the requeued job resumes and finishes
    assert "resuming from" in caplog.text and metrics["train_steps"] == 50
