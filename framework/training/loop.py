"""The one train loop every stage runs: config in, artifact out.

A stage changes it through `StageHooks` (prune before training, keep masks during it, quantize after
it, distil with another objective, save in another format); checkpoints, resume, logging and the
artifact contract are the same for all. A stage that only converts its input to another format (an
export) runs `convert` instead: the same artifact contract, measured in the runtime of its format.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import glob
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

import lightning.pytorch as pl
from omegaconf import DictConfig

from framework import artifacts
from framework.config import as_plain
from framework.distributed import is_rank_zero, local_world_size
from framework.evaluation import SPEED_THREADS
from framework.models import count_parameters, save_model_dir
from framework.runtimes import open_runtime
from framework.training.callbacks import AtomicCheckpoint, NanGuard, RequeueOnSignal, StepProgressBar, Throughput
from framework.training.tasks import TASKS
from framework.training.tracking import CHECKPOINTS, build_loggers, finish, log_stage_artifact

log = logging.getLogger(__name__)

# Settings that change how a run looks or where it is written, not what it computes.
NON_SEMANTIC_KEYS = ("run_dir", "paths", "logger", "input")  # input: its fingerprint counts, not its path
NON_SEMANTIC_TRAINER_KEYS = ("enable_progress_bar", "log_every_n_steps", "checkpoint_every_n_steps")
NON_SEMANTIC_DATA_KEYS = ("num_workers", "num_proc", "streaming", "test_paths")  # how data is read, not what


def semantic_config(cfg: DictConfig) -> dict:
    """The part of a stage config that its result depends on (what the fingerprint hashes)."""
    plain = as_plain(cfg)
    for key in NON_SEMANTIC_KEYS:
        plain.pop(key, None)
    if plain.get("model", {}).get("arch") == "artifact":
        plain["model"].pop("path")  # the input's fingerprint stands for it, wherever it lies
    for key in NON_SEMANTIC_TRAINER_KEYS:
        plain.get("trainer", {}).pop(key, None)
    for key in NON_SEMANTIC_DATA_KEYS:
        plain.get("data", {}).pop(key, None)
    return plain


def checkpoint_dir(stage_dir: str) -> str:
    return os.path.join(stage_dir, CHECKPOINTS)


def enclosing_stage(run_dir: str, stage_dir: str) -> str | None:
    """The stage a run in a subdirectory of its config's run_dir is a part of (distill's baseline), else None."""
    run_dir, stage_dir = os.path.abspath(run_dir), os.path.abspath(stage_dir)
    return run_dir if stage_dir != run_dir and os.path.commonpath([run_dir, stage_dir]) == run_dir else None


def resumable_checkpoint(stage_dir: str, stage_fingerprint: str) -> str | None:
    """The newest intact checkpoint written for this very config: last.ckpt, else the latest step*.ckpt;
    None to start afresh. Decided alike on every rank (each reads the same files)."""
    directory = checkpoint_dir(stage_dir)
    if artifacts.read_fingerprint(directory) not in (None, stage_fingerprint):
        return None
    steps = sorted(glob.glob(os.path.join(directory, "step*.ckpt")), reverse=True)
    candidates = [path for path in (os.path.join(directory, "last.ckpt"), *steps) if os.path.isfile(path)]
    for path in candidates:
        if intact_checkpoint(path):
            return path
        log.warning("%s is damaged (not a whole checkpoint): %s", path, "trying an older one" if path != candidates[-1] else "starting the stage afresh")
    return None


def intact_checkpoint(path: str) -> bool:
    """Whether a checkpoint file is whole: torch.save writes a zip archive, whose entries carry CRCs, so
    garbage or a cut file shows without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def claim_checkpoints(stage_dir: str, stage_fingerprint: str) -> None:
    """Never resume checkpoints written for a different config (or input): set them aside, start afresh.

    Rank 0 alone moves files; the other ranks reach the same decision in `resumable_checkpoint`.
    """
    directory = checkpoint_dir(stage_dir)
    owner = artifacts.read_fingerprint(directory)
    if not is_rank_zero():
        return
    if owner is not None and owner != stage_fingerprint and glob.glob(os.path.join(directory, "*.ckpt")):
        stale = f"{directory}.stale-{owner[:12]}"
        log.warning("%s holds checkpoints of another config: moved to %s, starting afresh", directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(directory, stale)
    artifacts.atomic_write_text(os.path.join(directory, artifacts.FINGERPRINT), stage_fingerprint + "\n")


def build_strategy(strategy_cfg: DictConfig, world_size: int):
    from lightning.pytorch.strategies import DDPStrategy

    name = strategy_cfg.name
    if name in ("ddp", "ddp_spawn"):
        return DDPStrategy(
            start_method="spawn" if name == "ddp_spawn" else "popen",
            find_unused_parameters=strategy_cfg.find_unused_parameters,
            process_group_backend=strategy_cfg.process_group_backend,
        )
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(sharding_strategy=strategy_cfg.sharding_strategy)
    if name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=strategy_cfg.stage, offload_optimizer=strategy_cfg.offload, offload_parameters=strategy_cfg.offload and strategy_cfg.stage == 3)
    if name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # One checkpoint file gathered on rank 0 (not a folder of shards): it is written atomically and resumed like the others.
        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return "auto"


def build_trainer(cfg: DictConfig, stage_dir: str, callbacks: list[pl.Callback], loggers) -> pl.Trainer:
    t = cfg.trainer
    checkpointing = AtomicCheckpoint(
        dirpath=checkpoint_dir(stage_dir), filename="step{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=1, save_last=True,
    )
    callbacks = [*callbacks, checkpointing, RequeueOnSignal(checkpointing), NanGuard()]
    if t.enable_progress_bar:
        callbacks.append(StepProgressBar(leave=True))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg.strategy, local_world_size(cfg) * t.num_nodes),
        precision=cfg.precision.name,
        max_steps=t.max_steps,
        # Validation every N optimizer steps; the batch stream is endless, so epochs play no part.
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=max(1, min(t.log_every_n_steps, t.max_steps)),  # a stage shorter than that logs its last step
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # ResumableBatchSampler shards the global batch itself
        default_root_dir=stage_dir,
        callbacks=callbacks,
        logger=loggers,
    )


def apply_lora(model, finetune_cfg: DictConfig, task: str):
    from peft import LoraConfig, get_peft_model

    target = finetune_cfg.target_modules
    lora = LoraConfig(
        r=finetune_cfg.r,
        lora_alpha=finetune_cfg.alpha,
        lora_dropout=finetune_cfg.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",  # SEQ_CLS keeps the new head trainable
    )
    return get_peft_model(model, lora)


def gather_shards(sharded, plain, prefix: str = ""):
    """The weights of a sharded model (FSDP2, or FSDP1 around a module whose keys start with `prefix`), gathered
    into `plain` on the CPU (every rank takes part; rank 0 receives them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:  # empty on ranks other than 0
        plain.load_state_dict({key.removeprefix(prefix): value for key, value in state.items()})
    return plain.cpu()


def merged_model(model):
    """The plain HF model to save: LoRA adapters folded into the weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


_extra_callbacks: contextvars.ContextVar[tuple[pl.Callback, ...]] = contextvars.ContextVar("extra_callbacks", default=())


@contextlib.contextmanager
def extra_callbacks(callbacks: Sequence[pl.Callback]):
    """Add callbacks to every stage trained inside the block (a search's trial reporting its val loss)."""
    token = _extra_callbacks.set((*_extra_callbacks.get(), *callbacks))
    try:
        yield
    finally:
        _extra_callbacks.reset(token)


@dataclass
class StageHooks:
    """How a compression stage changes the train loop; every field is optional.

    prepare_model(model, datamodule) -> model   before training: prune, fake-quantize, derive a student
    module_factory(model, cfg) -> LightningModule   another objective (distillation)
    callbacks                                    behaviour during training (gradual pruning, masks)
    finalize(model) -> model                     after training: QAT convert
    save_model(model, tokenizer, directory)      another artifact format (quantized)
    extra_metrics(model, datamodule) -> dict     stage-specific numbers for metrics.json
    """

    prepare_model: Callable | None = None
    module_factory: Callable | None = None
    callbacks: Sequence[pl.Callback] = ()
    finalize: Callable | None = None
    save_model: Callable | None = None
    extra_metrics: Callable | None = None


def train(
    cfg: DictConfig,
    stage_dir: str | None = None,
    input_fingerprints: Sequence[str] = (),
    job_type: str = "train",
    hooks: StageHooks | None = None,
) -> dict:
    """Run one stage and write its artifact; returns its metrics. A finished stage is not run again.

    `cfg` is a stage config its stage has validated (framework.stages). Every stage is this loop:
    build the model and data, let `hooks` change the model, train for `trainer.max_steps` (0: no
    training, as in one-shot pruning or PTQ), evaluate, write the artifact.
    """
    hooks = hooks or StageHooks()
    stage_dir = stage_dir or cfg.run_dir
    stage_fingerprint = artifacts.fingerprint(semantic_config(cfg), input_fingerprints)
    if _finished(stage_dir, stage_fingerprint):
        return artifacts.read_metrics(stage_dir)
    resume_from = resumable_checkpoint(stage_dir, stage_fingerprint)
    if is_rank_zero():
        artifacts.invalidate(stage_dir)
    claim_checkpoints(stage_dir, stage_fingerprint)
    part_of = enclosing_stage(cfg.run_dir, stage_dir)
    if part_of:  # its tracker run nests under that stage's, which this claims for this config (they share it)
        claim_checkpoints(part_of, stage_fingerprint)
    started = time.perf_counter()

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = TASKS[cfg.task.name]
    model, tokenizer, datamodule = task.build(cfg)
    start_metrics = task.start(model, datamodule, cfg)
    model.train()  # the evaluation left it in eval mode, which Lightning would keep (no dropout)
    if hooks.prepare_model is not None:
        model = hooks.prepare_model(model, datamodule)
    if cfg.finetune.method == "lora":
        model = apply_lora(model, cfg.finetune, task.name)
    module = (hooks.module_factory or task.module)(model, cfg)
    # model_parallel and fsdp shard the weights during fit; a plain copy receives them back afterwards.
    unsharded = copy.deepcopy(module.model) if cfg.strategy.name in ("model_parallel", "fsdp") else None

    throughput = Throughput(cfg.trainer.peak_flops, cfg.precision.name)
    loggers = build_loggers(cfg.logger, stage_dir, stage_fingerprint, job_type, as_plain(cfg), part_of)
    callbacks = [throughput, *hooks.callbacks, *_extra_callbacks.get()]
    if cfg.finetune.keep_sparsity:
        from framework.compression.gradual import KeepZeros

        callbacks.append(KeepZeros())
    trainer = build_trainer(cfg, stage_dir, callbacks, loggers)
    if resume_from:
        log.info("resuming from %s", resume_from)
    error = None
    try:
        _log_start(loggers, cfg, start_metrics)
        if cfg.trainer.max_steps > 0:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
        if cfg.strategy.name == "fsdp":  # FSDP wraps the whole LightningModule, whose keys start with "model."
            module.model = gather_shards(trainer.strategy.model, unsharded, prefix="model.")
        elif unsharded is not None:
            module.model = gather_shards(module.model, unsharded)
        if not (trainer.is_global_zero and is_rank_zero()):  # the trainer knows its rank only once it has trained
            return {}  # rank 0 alone evaluates and writes the artifact
        final = merged_model(module.model).float()
        if hooks.finalize is not None:
            final = hooks.finalize(final)
        metrics = {**task.evaluate(final, datamodule, cfg), **start_metrics}
        if cfg.trainer.max_steps > 0:
            metrics.update(**_training_totals(trainer, throughput), train_loss=_final(trainer, "train/loss"))
        if hooks.extra_metrics is not None:
            metrics.update(hooks.extra_metrics(final, datamodule))
        metrics.update(kind=job_type, wall_time_s=time.perf_counter() - started)
        save = hooks.save_model or save_model_dir
        artifacts.write_artifact(stage_dir, lambda d: save(final, tokenizer, d), metrics, cfg, stage_fingerprint)
        task.after_artifact(stage_dir, metrics)  # before the tracker takes the stage's files
        for logger in loggers:  # under the names of metrics.json, after the last training step
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics.get("train_steps", 0))
        log_stage_artifact(loggers, cfg.logger, stage_dir, metrics, stage_fingerprint, part_of)
        log.info("%s: %s %.4g (was %.4g)", stage_dir, task.measure, metrics[task.measure], metrics[f"{task.measure}_start"])
        return artifacts.read_metrics(stage_dir)
    except BaseException as err:
        error = err
        raise
    finally:
        finish(loggers, cfg.logger, error)


def convert(cfg: DictConfig, stage_dir: str | None, input_fingerprints: Sequence[str], job_type: str, write_model: Callable, extra_metrics: dict | None = None) -> dict:
    """A stage that does not train: write the input model in another format with `write_model(model,
    tokenizer, directory)` and measure the written files in the runtime that runs them
    (framework.runtimes.open_runtime). A finished stage is not run again."""
    stage_dir = stage_dir or cfg.run_dir
    stage_fingerprint = artifacts.fingerprint(semantic_config(cfg), input_fingerprints)
    if _finished(stage_dir, stage_fingerprint):
        return artifacts.read_metrics(stage_dir)
    artifacts.invalidate(stage_dir)
    started = time.perf_counter()
    task = TASKS[cfg.task.name]
    model, tokenizer, datamodule = task.build(cfg)
    total, nonzero = count_parameters(model)  # of the model written out: the runtime may not expose them

    def measure(model_dir: str) -> dict:
        metrics = {"params_total": total, "params_nonzero": nonzero, "sparsity": 1 - nonzero / total}
        metrics.update(task.evaluate(open_runtime(model_dir, SPEED_THREADS), datamodule, cfg))
        return {**metrics, **(extra_metrics or {}), "kind": job_type, "wall_time_s": time.perf_counter() - started}

    loggers = build_loggers(cfg.logger, stage_dir, stage_fingerprint, job_type, as_plain(cfg))
    error = None
    try:
        artifacts.write_artifact(stage_dir, lambda d: write_model(model, tokenizer, d), measure, cfg, stage_fingerprint)
        metrics = artifacts.read_metrics(stage_dir)
        task.after_artifact(stage_dir, metrics)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        # Under the names of metrics.json, as a training stage logs them, and its val measures as the one point
        # of the val/ curves (val/loss, val/ppl, val/accuracy), where a one-shot training stage starts them.
        curves = {f"val/{k.removeprefix('val_')}": v for k, v in numbers.items() if k.startswith("val_")}
        for logger in loggers:
            logger.log_metrics({**numbers, **curves}, step=0)
        log_stage_artifact(loggers, cfg.logger, stage_dir, metrics, stage_fingerprint)
        log.info("%s: %s %.4g in %s", stage_dir, task.measure, metrics[task.measure], metrics["runtime"])
        return metrics
    except BaseException as err:
        error = err
        raise
    finally:
        finish(loggers, cfg.logger, error)


def _finished(stage_dir: str, stage_fingerprint: str) -> bool:
    """Whether the stage's artifact is complete, intact and made by this very config (then it is not redone)."""
    if not artifacts.is_complete(stage_dir, stage_fingerprint):
        return False
    damage = artifacts.damaged(stage_dir)
    if damage is None:
        log.info("%s is complete with the same fingerprint: nothing to do", stage_dir)
        return True
    log.warning("%s is damaged (%s): running the stage again", stage_dir, damage)
    return False


def _log_start(loggers, cfg: DictConfig, start_metrics: dict) -> None:
    """The val measures of the model the stage was given (val/loss, val/ppl or val/accuracy), at step 0: where its
    curves start (a one-shot stage's only step). Not when Lightning validates after the first step, which it logs
    at step 0 as well."""
    if cfg.trainer.max_steps > 0 and cfg.trainer.val_check_interval == 1:
        return
    start = {f"val/{name.removeprefix('val_').removesuffix('_start')}": value for name, value in start_metrics.items()}
    for logger in loggers:
        logger.log_metrics(start, step=0)


def _training_totals(trainer: pl.Trainer, throughput: Throughput) -> dict:
    # Logged totals come back from ddp_spawn workers; the callback's own (checkpointed) state covers
    # a rerun that had nothing left to train.
    steps = _final(trainer, "train/steps") or trainer.global_step
    tokens = _final(trainer, "train/tokens_total") or throughput.total_tokens
    seconds = _final(trainer, "train/seconds_total") or throughput.total_seconds
    return {"train_steps": int(steps), "train_tokens": int(tokens), "train_tokens_per_s": tokens / seconds if seconds else 0.0}


def _final(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None
