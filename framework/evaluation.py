"""Measurements of a model in the runtime that runs it (framework.runtimes): held-out loss and perplexity,
parameters, one short generated sample, and speed as serving engineers measure it: the prefill latency
of a stated prompt length, and decode tokens/s at batch 1 and at batch 8, each the median of repeats
after a warm-up, with the runtime named."""

from __future__ import annotations

import math
import statistics
import time

import torch

from framework.models import count_parameters
from framework.runtimes import TorchRuntime, generate_ids

PROMPT_TOKENS = 128  # the prefill's prompt (at most the evaluation blocks' length)
NEW_TOKENS = 8  # decode steps per timed repeat
REPEATS = 3
BATCH_SIZES = (1, 8)
# One thread, for torch and onnxruntime alike: on a shared machine a second thread waiting for a busy core
# made a small model's decode 50x slower; one thread per model is the figure that repeats.
SPEED_THREADS = 1
SAMPLE_PROMPT = "In Python, a list"
SAMPLE_TOKENS = 24


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's ppl is only "huge"


def as_runtime(model):
    """A runtime as is; an nn.Module in torch eager."""
    return TorchRuntime(model) if isinstance(model, torch.nn.Module) else model


def evaluate_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of the blocks (a model or a runtime)."""
    runtime = as_runtime(model)
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        logits = runtime.logits(batch)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return total / tokens


def measure_speed(runtime, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS, repeats: int = REPEATS, batch_sizes=BATCH_SIZES) -> dict:
    """Prefill latency of `prompt` (1-D token ids) at batch 1, and decode tokens/s (all sequences together)
    at each batch size after that prompt: each the median of `repeats` timings after one warm-up. Torch
    runs on SPEED_THREADS threads for the duration; open an onnxruntime runtime with as many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        return {**_timings(runtime, prompt[None], new_tokens, repeats, batch_sizes), "threads": SPEED_THREADS}
    finally:
        torch.set_num_threads(threads)


def _timings(runtime, prompt: torch.Tensor, new_tokens: int, repeats: int, batch_sizes) -> dict:
    runtime.prefill(prompt)  # warm-up
    prefill_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.prefill(prompt)
        prefill_s.append(time.perf_counter() - start)
    metrics = {"runtime": runtime.name, "prefill_tokens": prompt.shape[1], "prefill_ms": 1000 * statistics.median(prefill_s), "decode_new_tokens": new_tokens}
    for batch in batch_sizes:
        logits, cache = runtime.prefill(prompt.expand(batch, -1))
        logits, cache = runtime.decode(logits.argmax(-1), cache)  # warm-up step
        rates = []
        for _ in range(repeats):  # one cache throughout: each repeat decodes the next `new_tokens` steps
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits, cache = runtime.decode(logits.argmax(-1), cache)
            rates.append(batch * new_tokens / (time.perf_counter() - start))
        metrics[f"decode_tokens_per_s_b{batch}"] = statistics.median(rates)
    return metrics


def sample_text(runtime, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = SAMPLE_TOKENS) -> str:
    """The prompt and its greedy continuation, to eyeball what a model has become."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = []
    for token in generate_ids(runtime, ids, new_tokens):
        if token.item() == tokenizer.eos_token_id:
            break
        generated.append(token.item())
    return tokenizer.decode([*ids[0].tolist(), *generated], skip_special_tokens=True)


def model_metrics(model, val_blocks: torch.Tensor, batch_size: int = 8, tokenizer=None, speed: bool = True) -> dict:
    """The model half of metrics.json (size_bytes is added when the artifact is written), for a torch model
    or a runtime; parameters are counted where there is a torch model to count."""
    runtime = as_runtime(model)
    val_loss = evaluate_loss(runtime, val_blocks, batch_size)
    metrics = {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "eval_blocks": len(val_blocks), "eval_block_tokens": val_blocks.shape[1]}
    if getattr(runtime, "model", None) is not None:
        total, nonzero = count_parameters(runtime.model)
        metrics.update(params_total=total, params_nonzero=nonzero, sparsity=1 - nonzero / total)
    if speed:
        metrics.update(measure_speed(runtime, val_blocks[0, :PROMPT_TOKENS]))
    if tokenizer is not None:
        metrics["sample"] = sample_text(runtime, tokenizer)
    return metrics
