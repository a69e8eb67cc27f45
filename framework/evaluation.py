"""Measurements of a model: validation loss and perplexity, parameters, size on disk, latency."""

from __future__ import annotations

import math
import time

import torch

from framework.models import count_parameters


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's ppl is only "huge"


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of the blocks."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        loss = model(input_ids=batch, labels=batch).loss
        count = batch[:, 1:].numel()
        total += loss.float().item() * count
        tokens += count
    return total / tokens


@torch.no_grad()
def measure_latency(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 8, repeats: int = 2) -> dict:
    """Greedy generation latency (ms per new token) and forward throughput (tokens/s) of one prompt."""
    model.eval()
    prompt = prompt[:1]
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generate_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=prompt)
    forward_s = (time.perf_counter() - start) / repeats
    return {"latency_ms_per_token": 1000 * generate_s / new_tokens, "tokens_per_s": prompt.numel() / forward_s}


def model_metrics(model: torch.nn.Module, val_blocks: torch.Tensor, batch_size: int = 8, latency: bool = True) -> dict:
    """The model half of metrics.json (size_bytes is added when the artifact is written)."""
    val_loss = evaluate_loss(model, val_blocks, batch_size)
    total, nonzero = count_parameters(model)
    metrics = {
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": 1 - nonzero / total,
    }
    if latency:
        metrics.update(measure_latency(model, val_blocks[:1]))
    return metrics
