"""Text from an artifact of any kind, token by token, each piece handed on as soon as it is decoded.

    python recipes/generate.py input=<stage dir> prompt="def fibonacci(n):" max_new_tokens=64
    framework.generate.generate_text("<stage dir>/model", "def fibonacci(n):", max_new_tokens=64, stream=print)

The artifact's format picks the runtime (framework.runtimes): torch for dense, pruned, low-rank, shared,
distilled and torchao-quantized models, onnxruntime for ONNX (the CPU int8 default of the quantize
stage, an ONNX export), transformers' GGUF reader for a GGUF export. Sampling: temperature (0: greedy),
then top-p (nucleus), drawn from a generator seeded with `seed`, so a seed repeats its text.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from framework import artifacts
from framework.config import GenerateConfig, in_range, positive, to_schema, unknown_key_message
from framework.errors import ConfigError
from framework.runtimes import generate_ids, open_runtime


def check(cfg: DictConfig) -> DictConfig:
    """The typed config, every value checked, the input an intact artifact (of any format)."""
    keys = list(GenerateConfig.__dataclass_fields__)
    unknown = [k for k in cfg if k not in keys]
    if unknown:  # `+foo=1` on the command line: Hydra adds it, nothing would read it
        raise ConfigError(unknown[0], unknown_key_message(unknown[0], keys))
    typed = to_schema(OmegaConf.create({k: cfg[k] for k in keys if k in cfg}), GenerateConfig)
    if not typed.input:
        raise ConfigError("input", "name an artifact (a stage's directory): input=<dir>")
    if not typed.prompt:
        raise ConfigError("prompt", 'give the text to continue: prompt="..."')
    if not isinstance(typed.max_new_tokens, int) or typed.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be an integer >= 1, got {typed.max_new_tokens}")
    positive("temperature", typed.temperature, allow_zero=True)
    in_range("top_p", typed.top_p, 0, 1, low_open=True)
    artifacts.check_artifact(typed.input, "input")
    if artifacts.holds_classifier(typed.input):
        raise ConfigError("input", f"'{typed.input}' holds a sequence classifier: it labels text, it does not generate any")
    return typed


def sampler(temperature: float, top_p: float, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [batch, vocab] -> token ids [batch]: greedy at temperature 0, else softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches top_p, drawn with a seeded generator."""
    if temperature == 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # tokens after the nucleus is full
        sorted_probs[outside] = 0.0
        picked = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, picked).squeeze(-1)

    return choose


def generate_text(model_dir: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                  seed: int = 0, stream: Callable[[str], object] | None = None, runtime=None) -> dict:
    """Continue `prompt` with the model in `model_dir` (an artifact's model/ directory, any format); each
    newly decoded piece of text goes to `stream` as it comes. Returns the text, the token count, the
    runtime, prefill ms and decode tokens/s of this generation."""
    from transformers import AutoTokenizer

    runtime = runtime or open_runtime(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated, shown = [], ""
    started = time.perf_counter()
    first = None
    for token in generate_ids(runtime, ids, max_new_tokens, sampler(temperature, top_p, seed)):
        first = first or time.perf_counter()
        if token.item() == tokenizer.eos_token_id:
            break
        generated.append(token.item())
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if stream is not None and not text.endswith("\ufffd"):  # hold back a character still missing bytes
            stream(text[len(shown):])
            shown = text
    ended = time.perf_counter()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if stream is not None and text != shown:
        stream(text[len(shown):])
    decode_s = ended - (first or ended)
    return {
        "prompt": prompt,
        "text": text,
        "new_tokens": len(generated),
        "runtime": runtime.name,
        "prefill_ms": 1000 * ((first or ended) - started),
        "decode_tokens_per_s": (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else None,
    }


def generate(cfg: DictConfig) -> dict:
    """The recipe: check, then stream the prompt and its continuation to stdout; the timing goes to stderr."""
    typed = check(cfg)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream(typed.prompt)
    result = generate_text(os.path.join(typed.input, artifacts.MODEL), typed.prompt, typed.max_new_tokens, typed.temperature, typed.top_p, typed.seed, stream)
    sys.stdout.write("\n")
    speed = f", {result['decode_tokens_per_s']:.1f} tokens/s" if result["decode_tokens_per_s"] else ""
    print(f"[{result['new_tokens']} tokens in {result['runtime']}: prefill {result['prefill_ms']:.0f} ms{speed}]", file=sys.stderr)
    return result
