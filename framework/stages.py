"""The compression stages: each reads an artifact, changes the model, writes a new artifact.

Every stage runs through `training.train` with its own hooks, so recovery finetunes, QAT and
distillation share the train loop (checkpoints, resume, logging, the artifact contract).
`trainer.max_steps` is a stage's training budget: 0 means one-shot (no training).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

from framework import artifacts
from framework.compression import distillation, gradual, lowrank, pruning, quantization, structured
from framework.config import ConfigError, validate_stage_config
from framework.models import load_model_dir, save_lowrank
from framework.modules import DistillationModule
from framework.training import StageHooks, train


def use_input_model(cfg: DictConfig, input_dir: str, key: str = "input") -> DictConfig:
    """Point the config's model at an artifact's model/, after checking the artifact is whole."""
    if not artifacts.is_complete(input_dir):
        raise ConfigError(key, f"'{input_dir}' is not a complete artifact (no {artifacts.COMPLETE} file)")
    return point_model_at(cfg, input_dir)


def point_model_at(cfg: DictConfig, input_dir: str) -> DictConfig:
    """The config with its model read from an artifact's model/ (the tokenizer comes with it)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(cfg.model, {"arch": "pretrained", "path": os.path.join(input_dir, artifacts.MODEL), "gguf_file": None, "tokenizer": "pretrained"})
    return cfg


def _input_fingerprints(*dirs: str) -> list[str]:
    return [artifacts.read_fingerprint(d) or "" for d in dirs]


def _validator(kind: str):
    return lambda cfg: validate_stage_config(cfg, kind)


# --- prune ---------------------------------------------------------------------------------------------------


def one_shot_prune(cfg: DictConfig):
    """prepare_model hook: prune the loaded model with calibration data from the train split."""
    p = cfg.prune
    n_m = tuple(p.n_m) if p.n_m else None

    def prepare(model, datamodule):
        calib = datamodule.calibration_batches(p.calibration_samples)
        if p.method == "magnitude":
            pruning.prune_magnitude(model, p.sparsity, scope=p.scope, n_m=n_m)
        elif p.method == "wanda":
            pruning.prune_wanda(model, calib, p.sparsity, n_m=n_m)
        elif p.method == "sparsegpt":
            pruning.prune_sparsegpt(model, calib, p.sparsity, n_m=n_m, block_size=p.block_size, damp=p.damp)
        elif p.method == "structured":
            structured.prune_structured(model, calib, heads_ratio=p.heads_ratio, mlp_ratio=p.mlp_ratio, drop_layers=p.drop_layers)
        return model

    return prepare


def prune(cfg: DictConfig, stage_dir: str | None = None, input_fingerprints=()) -> dict:
    cfg = use_input_model(cfg, cfg.input)
    p = cfg.prune
    n_m = tuple(p.n_m) if p.n_m else None
    if p.method == "gradual":
        hooks = StageHooks(callbacks=[gradual.GradualPruning(p.sparsity, p.start_step, p.end_step, p.every_n_steps, n_m=n_m)])
    else:
        # Recovery finetune (max_steps > 0): the pruned weights stay zero through every optimizer step.
        keep = [gradual.KeepZeros()] if cfg.trainer.max_steps > 0 and p.method != "structured" else []
        hooks = StageHooks(prepare_model=one_shot_prune(cfg), callbacks=keep)
    hooks.extra_metrics = lambda model, _: _sparsity_metrics(model, n_m)
    return train(cfg, stage_dir, [*input_fingerprints, *_input_fingerprints(cfg.input)], "prune", hooks, _validator("prune"))


def _sparsity_metrics(model, n_m) -> dict:
    report = pruning.sparsity_report(model)
    metrics = {
        "prunable_params": report["params"],
        "prunable_nonzero": report["nonzero"],
        "prunable_sparsity": report["sparsity"],
        "layers": report["layers"],
    }
    if n_m:
        metrics["n_m_ok"] = all(pruning.check_n_m(pruning.weight_matrix(m), *n_m) for m in pruning.prunable_linears(model).values())
    return metrics


# --- low-rank --------------------------------------------------------------------------------------------------


def factorize(cfg: DictConfig, stage_dir: str | None = None, input_fingerprints=()) -> dict:
    cfg = use_input_model(cfg, cfg.input)
    r = cfg.lowrank

    def prepare(model, datamodule):
        model.lowrank_spec = lowrank.lowrank_factorize(model, rank=r.rank, energy=r.energy, targets=list(r.targets))
        return model

    hooks = StageHooks(
        prepare_model=prepare,
        save_model=save_lowrank,
        extra_metrics=lambda model, _: {"lowrank_layers": len(model.lowrank_spec), "ranks": model.lowrank_spec},
    )
    return train(cfg, stage_dir, [*input_fingerprints, *_input_fingerprints(cfg.input)], "lowrank", hooks, _validator("lowrank"))


# --- quantize --------------------------------------------------------------------------------------------------


def quantize(cfg: DictConfig, stage_dir: str | None = None, input_fingerprints=()) -> dict:
    cfg = use_input_model(cfg, cfg.input)
    q = cfg.quantize
    _check_available(q.method)
    if q.qat:
        hooks = StageHooks(
            prepare_model=lambda model, _: quantization.prepare_qat(model, q.method),
            finalize=lambda model: quantization.convert_qat(model, q.method),
        )
    else:
        hooks = StageHooks(finalize=lambda model: quantization.quantize_ptq(model, q.method, q.group_size))
    hooks.save_model = lambda model, tokenizer, d: _save_quantized(model, tokenizer, d, q)
    hooks.extra_metrics = lambda model, _: {"quantization": q.method, "qat": q.qat}
    return train(cfg, stage_dir, [*input_fingerprints, *_input_fingerprints(cfg.input)], "quantize", hooks, _validator("quantize"))


def _check_available(method: str) -> None:
    """Fail before loading anything when the machine lacks the kernel (a one-line error, not a traceback)."""
    try:
        quantization.check_available(method)
    except RuntimeError as err:
        raise ConfigError("quantize.method", str(err).splitlines()[0]) from None


def _save_quantized(model, tokenizer, directory: str, q: DictConfig) -> None:
    quantization.save_quantized(model, directory, q.method, q.group_size)
    tokenizer.save_pretrained(directory)


# --- distill ---------------------------------------------------------------------------------------------------


def distill(cfg: DictConfig, stage_dir: str | None = None, input_fingerprints=()) -> dict:
    """Train a student against a frozen teacher; with distill.baseline, also the same student alone."""
    teacher_dir = cfg.distill.teacher
    if cfg.distill.student == "derive":
        cfg = use_input_model(cfg, teacher_dir, key="distill.teacher")
    else:  # a student built from the `model` group, sharing the teacher's tokenizer
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.model.tokenizer = os.path.join(teacher_dir, artifacts.MODEL)
    validated = validate_stage_config(cfg, "distill")
    stage_dir = stage_dir or validated.run_dir
    inputs = [*input_fingerprints, *_input_fingerprints(teacher_dir)]
    teacher = load_model_dir(os.path.join(teacher_dir, artifacts.MODEL)).eval()
    prepare = _student_builder(validated.distill, teacher)

    extra = {}
    if validated.distill.baseline:
        baseline = train(cfg, os.path.join(stage_dir, "baseline"), inputs, "distill-baseline", StageHooks(prepare_model=prepare), _validator("distill"))
        if baseline:  # empty on ranks other than 0, which write nothing
            extra = {"baseline_val_loss": baseline["val_loss"], "baseline_val_ppl": baseline["val_ppl"]}
    d = validated.distill
    hooks = StageHooks(
        prepare_model=prepare,
        module_factory=lambda model, c: DistillationModule(model, teacher, c.optimizer, c.scheduler, c.trainer.max_steps, d.loss, d.temperature, d.alpha),
        extra_metrics=lambda model, _: {**extra, "teacher_params": sum(p.numel() for p in teacher.parameters())},
    )
    return train(cfg, stage_dir, inputs, "distill", hooks, _validator("distill"))


def _student_builder(d: DictConfig, teacher):
    def prepare(model, datamodule):
        try:  # logit distillation compares distributions over one shared vocabulary
            distillation.check_vocab_sizes(teacher.config, model.config)
        except ValueError as err:
            raise ConfigError("distill.student", str(err)) from None
        if d.student == "derive":
            return distillation.derive_student(teacher, num_layers=d.num_layers, layer_ratio=None if d.num_layers else d.layer_ratio, intermediate_ratio=d.intermediate_ratio)
        return model

    return prepare


def train_from(cfg: DictConfig, stage_dir: str | None = None, input_fingerprints=()) -> dict:
    """A train stage; with `input` set (a pipeline's finetune), it starts from that artifact's model."""
    if cfg.get("input"):
        cfg = use_input_model(cfg, cfg.input)
        input_fingerprints = [*input_fingerprints, *_input_fingerprints(cfg.input)]
    return train(cfg, stage_dir, input_fingerprints)


STAGES = {"train": train_from, "prune": prune, "lowrank": factorize, "quantize": quantize, "distill": distill}


def evaluate(cfg: DictConfig) -> dict:
    """Measure an artifact on the configured data, or rebuild the report of a pipeline run directory."""
    from framework import report
    from framework.config import validate_train_config
    from framework.data import LMDataModule, load_documents
    from framework.evaluation import model_metrics
    from framework.models import build_model_and_tokenizer

    if not artifacts.is_complete(cfg.input) and os.path.isdir(cfg.input):
        return {"rows": report.rebuild(cfg.input)}
    cfg = validate_train_config(use_input_model(cfg, cfg.input))
    documents = load_documents(cfg.data)
    model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.paths.cache_dir)
    datamodule = LMDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.seed, documents)
    metrics = model_metrics(model, datamodule.val_blocks(), cfg.data.batch_size)
    metrics.update(size_bytes=artifacts.directory_size(cfg.model.path), data=cfg.data.name)
    artifacts.atomic_write_json(os.path.join(cfg.run_dir, "evaluation.json"), metrics)
    report.print_table([report.row(os.path.basename(os.path.normpath(cfg.input)), "evaluate", cfg.input, metrics, False, 0.0)], "evaluation")
    return metrics
