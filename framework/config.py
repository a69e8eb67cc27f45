"""Config schemas and the checks every section uses.

Hydra composes YAML from `conf/`; each stage merges the result into its schema (a dataclass built from
the sections below plus its own), so a wrong type or an unknown key fails with the key named, and then
checks ranges. Every problem raises `ConfigError`, which recipes print as one line and exit 2.
The checks of a section live with the code that uses it (models, data, training, hardware); the
schema of everything is here, at the bottom, so that any layer can read it.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.errors import ConfigError


# --- the sections every stage has ----------------------------------------------------------------------------


@dataclass
class TaskConfig:
    name: str = "causal_lm"  # causal_lm: next-token prediction | classification: a label per text (or text pair)
    lr: Optional[float] = None  # every stage's default learning rate for this task (null: each stage's own)
    distill_temperature: Optional[float] = None  # distill's default temperature and alpha for this task (null: the loss's own)
    distill_alpha: Optional[float] = None


@dataclass
class ModelConfig:
    name: str = "model"
    arch: str = "llama"  # llama | gpt2 (from scratch) | pretrained (HF dir, GGUF or hub id) | artifact (a stage's output)
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    tie_embeddings: bool = True
    vocab_size: Optional[int] = None  # size of the BPE tokenizer trained on the corpus (from-scratch models)
    share_layers: int = 1  # from scratch: groups of this many adjacent layers share one set of weights
    tokenizer: str = "bpe"  # bpe (trained on the corpus, cached) | pretrained | a tokenizer directory
    path: Optional[str] = None  # pretrained: HF directory, directory holding gguf_file, or hub id; artifact: its directory
    gguf_file: Optional[str] = None
    archive: Optional[str] = None  # pretrained: a zip in `path` holding the model files (extracted once into the cache)


@dataclass
class DataConfig:
    name: str = "stdlib_docs"
    source: str = "stdlib_docs"
    paths: list[str] = field(default_factory=list)  # text_files: .txt (cut into documents at blank lines), .jsonl, .parquet
    val_paths: list[str] = field(default_factory=list)  # the val split's files (else val_fraction of the documents, by hash)
    test_paths: list[str] = field(default_factory=list)  # files the evaluate recipe scores whole
    text_field: str = "text"
    text_pair_field: Optional[str] = None  # classification: a second text per example (sentence pairs)
    label_field: str = "label"  # classification: the label column (names or integers)
    topics: list[str] = field(default_factory=list)  # stdlib_topics: the standard library packages to tell apart
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    streaming: bool = False  # hf_dataset: read the rows as they download, without downloading the split first
    max_chars: Optional[int] = None  # cap the corpus size (stdlib_modules is large)
    block_size: int = 128
    batch_size: int = 8
    val_fraction: float = 0.1
    max_val_blocks: Optional[int] = None
    num_workers: int = 0  # DataLoader worker processes
    num_proc: Optional[int] = None  # tokenizing threads when a corpus is prepared; null: one per CPU core
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
    name: str = "csv"  # csv is always on; wandb, mlflow or tensorboard come in addition
    project: str = "framework"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb: offline (default, WANDB_MODE wins) | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None
    uses: list[str] = field(default_factory=list)  # the stage directories whose artifacts this one reads (lineage)
    tracking_uri: Optional[str] = None  # mlflow: the tracking server (conf/logger/mlflow.yaml: a local one)
    experiment: str = "framework"  # mlflow: the experiment the runs go into
    log_model: bool = True  # mlflow: upload each stage's model/ and register it as a model version


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
class StageConfig:
    """What every stage's config holds; a stage kind adds its own section (framework/stages/<kind>.py)."""

    task: TaskConfig = field(default_factory=TaskConfig)
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
    run_dir: str = "outputs/run"
    input: Optional[str] = None  # the artifact this stage reads (a finetune's starting model, what to prune, ...)
    # The held-out data of the final metrics (val split): a pipeline sets its evaluation set here, the same
    # for every stage; null: the val split of `data`.
    eval_data: Optional[DataConfig] = None
    hparams_search: Optional[SearchConfig] = None


@dataclass
class GenerateConfig:
    """recipes/generate.py: text from an artifact of any kind, streamed (framework.generate)."""

    input: Optional[str] = None  # the artifact (a stage's directory)
    prompt: Optional[str] = None
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95  # sample from the smallest set of tokens holding this probability (1: all)
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_dir: str = "outputs/generate"


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
    task: TaskConfig = field(default_factory=TaskConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 1234
    run_dir: str = "outputs/pipeline/default"
    hparams_search: Optional[SearchConfig] = None


# --- typing a config ----------------------------------------------------------------------------------------


def to_schema(cfg: DictConfig | dict, schema: type, prefix: str = "") -> DictConfig:
    """Merge `cfg` into the dataclass `schema`: a wrong type or an unknown key becomes a ConfigError.

    `prefix` is where `cfg` sits in the whole config (e.g. "prune"), so the error names the full key.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
        return merged
    except OmegaConfBaseException as err:
        inner = getattr(err, "full_key", None) or ""
        key = ".".join(part for part in (prefix, inner) if part) or "config"
        first_line = str(err).splitlines()[0]
        if "not in struct" in first_line or ("Key '" in first_line and "not" in first_line):
            first_line = unknown_key_message(inner.split(".")[-1], allowed_keys(schema, inner))
        raise ConfigError(key, first_line) from None


def allowed_keys(schema: type, full_key: str) -> list[str]:
    """The keys of the dataclass node that holds `full_key` (a dotted path inside `schema`)."""
    node = schema
    for part in full_key.split(".")[:-1]:
        fld = {f.name: f for f in fields(node)}.get(part)
        if fld is None or not is_dataclass(fld.default_factory):
            break
        node = fld.default_factory
    return [f.name for f in fields(node)]


def unknown_key_message(key: str, allowed: list[str]) -> str:
    """'unknown key', with the nearest allowed key when one is close, and the allowed keys."""
    nearest = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
    return f"unknown key{hint} (allowed: {', '.join(allowed)})"


# --- range checks -------------------------------------------------------------------------------------------


def one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, f"'{value}' is not one of {', '.join(map(str, allowed))}")


def finite(key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    finite(key, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def in_range(key: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """low <= value <= high, with either end excluded when open."""
    finite(key, value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(key, f"must be in {interval}, got {value}")


# --- small helpers ------------------------------------------------------------------------------------------


def as_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
