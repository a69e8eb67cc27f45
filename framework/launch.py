"""Start the processes of a multi-process (DDP) stage ourselves, from the resolved stage config.

Lightning's own launcher re-runs `sys.argv` for every extra rank. Under Hydra that re-parses the
command line in each child: a `-m` sweep starts a sweep in every child (Lightning #11300), and the
children get a run directory of their own. We launch instead at the level of a stage: the main
process writes the stage's resolved config to a file and starts `devices - 1` workers with
`python -m framework.launch <file>`; each worker runs the same stage function on the same config,
so every rank sees the same run directory and each sweep job, or pipeline stage, gets its own
correctly launched process group on a fresh port.

When the environment starts the processes (torchrun, srun, or LOCAL_RANK set by hand), nothing is
launched: Lightning reads the ranks from the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from framework.distributed import launched_externally, local_world_size
from framework.environment import quiet_libraries
from framework.errors import ConfigError, PreemptedError
from framework.stages import STAGES

log = logging.getLogger(__name__)


def needs_launch(cfg: DictConfig) -> bool:
    """A stage that trains (max_steps > 0) on several local devices, with no launcher around us."""
    return cfg.trainer.max_steps > 0 and local_world_size(cfg) > 1 and not launched_externally()


def run_stage(kind: str, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
    """Run one stage on its validated config (framework.stages.STAGES[kind].validate), launching the other
    ranks first when the config asks for them."""
    if not needs_launch(cfg):
        return STAGES[kind].run(cfg, stage_dir, input_fingerprints)
    with launched_workers(kind, cfg, stage_dir, input_fingerprints):
        return STAGES[kind].run(cfg, stage_dir, input_fingerprints)


def _rendezvous(cfg: DictConfig) -> tuple[str, str, int]:
    """MASTER_ADDR, MASTER_PORT and this node's rank. One node picks them; several nodes must be told."""
    if cfg.trainer.num_nodes == 1:
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        return "127.0.0.1", str(find_free_network_port()), 0
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if key not in os.environ]
    if missing:
        raise ConfigError(
            "trainer.num_nodes",
            f"{cfg.trainer.num_nodes} nodes need {', '.join(missing)} in the environment of each node's command "
            "(or start the processes with torchrun, or use launcher=slurm)",
        )
    return os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], int(os.environ["NODE_RANK"])


@contextlib.contextmanager
def launched_workers(kind: str, cfg: DictConfig, stage_dir: str | None, input_fingerprints: Sequence[str]) -> Iterator[None]:
    """Start local ranks 1..N-1 as workers; this process becomes local rank 0 for the duration."""
    devices = local_world_size(cfg)
    address, port, node_rank = _rendezvous(cfg)
    shared = {"MASTER_ADDR": address, "MASTER_PORT": port, "NODE_RANK": str(node_rank), "WORLD_SIZE": str(devices * cfg.trainer.num_nodes)}
    spec = OmegaConf.create({"kind": kind, "config": OmegaConf.to_container(cfg, resolve=True), "stage_dir": stage_dir, "input_fingerprints": list(input_fingerprints)})
    fd, spec_path = tempfile.mkstemp(prefix="framework-launch-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(spec))
    workers = []
    for local_rank in range(1, devices):
        env = {**os.environ, **shared, "LOCAL_RANK": str(local_rank), "RANK": str(node_rank * devices + local_rank)}
        workers.append(subprocess.Popen([sys.executable, "-m", "framework.launch", spec_path], env=env))
    log.info("launched %d worker processes (node rank %d, port %s)", len(workers), node_rank, port)
    saved = {key: os.environ.get(key) for key in (*shared, "LOCAL_RANK", "RANK")}
    os.environ.update(shared, LOCAL_RANK="0", RANK=str(node_rank * devices))
    watchdog = _Watchdog(workers)
    try:
        yield
        watchdog.stop()
        for worker in workers:
            if worker.wait() != 0:
                raise RuntimeError(f"a worker process exited with code {worker.returncode}")
    finally:
        watchdog.stop()
        _stop_workers(workers)
        _restore_environment(saved)
        _destroy_process_group()
        os.unlink(spec_path)


def _stop_workers(workers: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Give the workers time to leave on their own (after a preemption they stop at the same step as
    this rank), then kill them. Workers write nothing, so killing loses nothing. Not SIGTERM: Lightning's
    SIGTERM handler broadcasts from rank 0, which has left the collectives, and the worker would hang."""
    deadline = time.monotonic() + grace_s
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d still running after %.0f s: killing it", worker.pid, grace_s)
            worker.kill()
            worker.wait()


class _Watchdog:
    """Stops this process when a worker dies: the main process would otherwise wait in a collective."""

    def __init__(self, workers: list[subprocess.Popen]):
        self.workers, self.stopped = workers, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            failed = [w for w in self.workers if w.poll() not in (None, 0)]
            if failed:
                log.error("worker process %d exited with code %d: stopping", failed[0].pid, failed[0].returncode)
                import _thread

                _thread.interrupt_main()
                if not self.stopped.wait(30):  # still blocked in a collective: nothing left to save
                    os._exit(1)
                return

    def stop(self) -> None:
        self.stopped.set()


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _destroy_process_group() -> None:
    """The next stage or sweep job starts a new process group (a new world, a new port)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def worker_main(spec_path: str) -> None:
    """A worker rank: run the stage the main process described (its config validated there), and exit."""
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    spec = OmegaConf.load(spec_path)
    try:
        STAGES[spec.kind].run(spec.config, spec.stage_dir, list(spec.input_fingerprints))
    except PreemptedError:
        pass  # the checkpoint is saved; rank 0 requeues or reports
    _destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1])
