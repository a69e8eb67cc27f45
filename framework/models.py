"""Build a causal LM and its tokenizer: from a config (random init) or pretrained (HF dir, GGUF file, hub id)."""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import torch
from omegaconf import DictConfig
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from framework.artifacts import atomic_directory
from framework.config import ConfigError, _short_hash

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def resolve_pretrained(model_cfg: DictConfig, cache_dir: str) -> str:
    """A local HF directory (or hub id) for a pretrained model; a GGUF file is converted once and cached."""
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


LOWRANK_SPEC = "lowrank.json"
QUANTIZATION_SPEC = "quantization.json"


def load_model_dir(path: str) -> PreTrainedModel:
    """Any model directory the framework writes: HF, quantized (torchao) or low-rank factorized."""
    if os.path.isfile(os.path.join(path, QUANTIZATION_SPEC)):
        from framework.compression.quantization import load_quantized

        return load_quantized(path)
    if os.path.isfile(os.path.join(path, LOWRANK_SPEC)):
        return load_lowrank(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def save_lowrank(model, tokenizer, directory: str) -> None:
    """Low-rank layers are not an HF architecture: config + factorization spec + safetensors."""
    import json

    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    with open(os.path.join(directory, LOWRANK_SPEC), "w") as f:
        json.dump(model.lowrank_spec, f, indent=2)
    save_model(model, os.path.join(directory, "model.safetensors"))
    tokenizer.save_pretrained(directory)


def load_lowrank(path: str) -> PreTrainedModel:
    import json

    from safetensors.torch import load_model
    from transformers import AutoConfig

    from framework.compression.lowrank import apply_lowrank_spec

    with open(os.path.join(path, LOWRANK_SPEC)) as f:
        spec = json.load(f)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    apply_lowrank_spec(model, spec)
    load_model(model, os.path.join(path, "model.safetensors"))
    model.lowrank_spec = spec
    return model


def load_pretrained(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model = load_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train_bpe_tokenizer(texts: Callable[[], Iterable[str]], vocab_size: int, corpus_id: str, cache_dir: str):
    """A byte-level BPE tokenizer trained on the corpus, cached by (corpus, vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    target = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{_short_hash(corpus_id)}")
    if not os.path.isfile(os.path.join(target, "tokenizer.json")):
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
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_model_and_tokenizer(model_cfg: DictConfig, cache_dir: str, corpus=None):
    """The model and tokenizer a train stage starts from.

    `corpus` is a `(texts_fn, corpus_id)` pair, used only to train a BPE tokenizer for a from-scratch model.
    """
    if model_cfg.arch == "pretrained":
        model, tokenizer = load_pretrained(resolve_pretrained(model_cfg, cache_dir))
        return model, tokenizer
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
    """(total, non-zero) parameters, counting tied weights once."""
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
