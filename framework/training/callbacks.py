"""Training callbacks: throughput and MFU, a NaN/inf guard, atomic checkpoints that also save on Ctrl-C,
and a save-and-requeue on the signal a cluster sends before it stops a job."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from framework.errors import NonFiniteLossError, PreemptedError, StorageError

log = logging.getLogger(__name__)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of N non-embedding parameters, plus attention.

    The attention term 12·L·d·T (scores and weighted sum, forward and backward) follows the PaLM
    paper's appendix B; embeddings are lookups and cost no matmul.
    """
    config = model.config
    embedding_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params = sum(p.numel() for p in model.parameters()) - embedding_params
    output = model.get_output_embeddings() if getattr(config, "tie_word_embeddings", False) else None
    if output is not None:  # a tied lm_head's matmul still happens (a classifier has no lm_head)
        params += output.weight.numel()
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * params + 12 * layers * width * seq_len


@functools.lru_cache(maxsize=4)
def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024, seconds: float = 0.5) -> float:
    """Dense matmul FLOP/s this machine reaches in `dtype` (the MFU denominator when none is configured)."""
    # Its own generator: drawing from the global one would shift dropout in whichever run measures first (the
    # result is cached per process), so a distill stage's baseline and student would see different masks.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    (a @ b).sum().item()  # warm-up, and a sync on GPUs
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        runs += 1
    c.sum().item()
    return 2 * size**3 * runs / (time.perf_counter() - start)


class Throughput(pl.Callback):
    """Logs tokens/s and model FLOPs utilisation every step; totals go into metrics.json."""

    def __init__(self, peak_flops: float | None = None, precision: str = "32-true"):
        self.peak_flops = peak_flops
        self.dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else torch.float32
        self.total_tokens, self.total_seconds = 0, 0.0
        self._flops_per_token = None
        self._last = None

    def on_train_start(self, trainer, pl_module):
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(self.dtype, pl_module.device.type)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        input_ids = batch["input_ids"]
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(pl_module.model, input_ids.shape[1])
        tokens = input_ids.numel() * trainer.world_size
        self.total_tokens += tokens
        self.total_seconds += seconds
        pl_module.log("train/tokens_per_s", tokens / seconds, prog_bar=True)
        pl_module.log("train/mfu", self._flops_per_token * input_ids.numel() / seconds / self.peak_flops)
        # Totals travel as logged metrics: they reach the main process under ddp_spawn too.
        pl_module.log_dict({"train/steps": float(trainer.global_step), "train/tokens_total": float(self.total_tokens), "train/seconds_total": self.total_seconds})

    def on_validation_end(self, trainer, pl_module):
        self._last = time.perf_counter()  # validation time is not training time

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_seconds": self.total_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_tokens, self.total_seconds = state_dict["total_tokens"], state_dict["total_seconds"]


class NanGuard(pl.Callback):
    """Stops at the first non-finite loss, before a checkpoint of the broken weights can be written."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            checkpoint = trainer.checkpoint_callback and trainer.checkpoint_callback.last_model_path
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {trainer.global_step}; the last good checkpoint is "
                f"{checkpoint or 'none yet'} (lower optimizer.lr or use precision=32-true)"
            )


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files appear whole or not at all, and which also saves on Ctrl-C."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        directory, name = os.path.split(filepath)
        tmp = os.path.join(directory, f".{name}.tmp")
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                if not os.path.isfile(tmp):  # Lightning's writer swallows a PermissionError: find the real cause
                    raise unwritable(directory) or OSError(f"{tmp} was not written")
                os.replace(tmp, filepath)
        except OSError as err:
            raise StorageError(f"cannot write checkpoint {filepath}: {err.strerror or err}") from None
        trainer.strategy.barrier("atomic_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def save_last_checkpoint(self, trainer: pl.Trainer, why: str) -> None:
        if trainer.global_step > self._last_global_step_saved:
            log.info("%s: saving %s at step %d", why, self.CHECKPOINT_NAME_LAST, trainer.global_step)
            self._save_checkpoint(trainer, os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"))

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            self.save_last_checkpoint(trainer, "interrupted")

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        """Lightning warns that the directory 'exists and is not empty' on every fresh run, because it holds our
        fingerprint file. Checkpoints of another config are set aside before training (training.loop), so
        there is nothing to warn about."""


def unwritable(directory: str) -> OSError | None:
    """The error that writing a file into `directory` gives (permission, disk full, read-only), or None."""
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
        os.unlink(probe)
    except OSError as err:
        return err
    return None


class RequeueOnSignal(pl.Callback):
    """On SIGUSR1 (Slurm's warning before a time limit or preemption): save last.ckpt, then requeue.

    The signal only sets a flag; at the next step boundary every rank agrees to stop (one rank may
    be the only one signalled), the checkpoint is saved, and the job is requeued: by submitit's
    handler when submitit runs the job (launcher=slurm or local), else by `scontrol requeue` under
    Slurm. Anywhere else the run stops with PreemptedError, and rerunning the command resumes it.
    """

    def __init__(self, checkpoint: AtomicCheckpoint, signum: int = signal.SIGUSR1):
        self.checkpoint, self.signum = checkpoint, signum
        self.requested, self.previous = False, None

    def setup(self, trainer, pl_module, stage):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(self.signum, self._request)

    def teardown(self, trainer, pl_module, stage):
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def _request(self, signum, frame):
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.checkpoint.save_last_checkpoint(trainer, f"signal {signal.Signals(self.signum).name}")
        previous = self.previous
        self.teardown(trainer, pl_module, "fit")
        if callable(previous):  # submitit's handler: rank 0 requeues the job and exits
            previous(self.signum, None)
        elif "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        raise PreemptedError(f"stopped by signal {self.signum} at step {trainer.global_step}; last.ckpt saved, rerun to resume")


class StepProgressBar(RichProgressBar):
    """Rich progress in optimizer steps of the stage. The batch stream is endless and every stage is one
    "epoch", so Lightning's own bar would read 'Epoch 0/-2' with no total."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps * self.trainer.accumulate_grad_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'training':{len(self.validation_description)}}"
